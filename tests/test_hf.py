"""lowrank.save_pretrained (lowrank/hf.py): a merged model transformers loads as a plain model, or
the adapter in peft's format; the model left exactly as it was."""
import copy

import pytest
import torch

import lowrank
from tests.models import SMALL_MODELS, ids, logits, randomize_B_

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_loads_as_a_plain_model(tmp_path, arch):
    """AutoModelForCausalLM.from_pretrained finds every key and no other, and computes what the
    patched model computes (to fp32 rounding of the merge); afterwards the patched model is
    unmerged, bit for bit, and still trains its adapter."""
    model = lowrank.patch_linear(SMALL_MODELS[arch](), rank=4)
    randomize_B_(model)
    x = ids()
    ref = logits(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    lowrank.save_pretrained(model, tmp_path, merged=True)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    out = logits(loaded, x)
    assert not torch.allclose(ref, logits(SMALL_MODELS[arch](), x)), "the adapter must change the output"
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(layer.merged for _, layer in lowrank.lora_layers(model))


def test_adapter_save_and_refusals(tmp_path):
    base = SMALL_MODELS["llama"]()
    model = lowrank.patch_linear(copy.deepcopy(base), rank=4)
    randomize_B_(model)
    lowrank.save_pretrained(model, tmp_path / "adapter")
    back = lowrank.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    x = ids()
    assert torch.equal(logits(back, x), logits(model, x))
    with pytest.raises(TypeError, match="takes no"):
        lowrank.save_pretrained(model, tmp_path / "a2", max_shard_size="1MB")
    plain = lowrank.patch_linear(torch.nn.Sequential(torch.nn.Linear(8, 8)), rank=2)
    with pytest.raises(TypeError, match="needs a transformers model"):
        lowrank.save_pretrained(plain, tmp_path / "p", merged=True)
    qmodel = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=4, quantize="nf4", compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(ValueError, match="merge_and_unload"):
        lowrank.save_pretrained(qmodel, tmp_path / "q", merged=True)
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())
    assert not (tmp_path / "q").exists()


def test_a_failed_merged_save_leaves_the_directory_and_model_as_they_were(tmp_path, monkeypatch):
    model = lowrank.patch_linear(SMALL_MODELS["llama"](), rank=4)
    randomize_B_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    real = type(model).save_pretrained

    def half_written(self, directory, **kw):
        real(self, directory, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        lowrank.save_pretrained(model, target, merged=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
