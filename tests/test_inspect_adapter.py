"""lowrank/inspect_adapter.py and `lowrank inspect`: the spectrum of s * B @ A from the factors,
checked against the SVD of the dense float64 matrix; adapters written by peft 0.21.2 and lowrank."""
import copy
import json
import math

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, strategies as st

import lowrank
from lowrank import cli
from lowrank.checkpoint import Checkpoint
from lowrank.inspect_adapter import inspect_adapter, singular_values, spectrum_stats
from tests.models import randomize_lora_, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _dense_sv(a, b, s):
    """Singular values of the dense float64 s * B @ A, padded with zeros to r (numpy's SVD)."""
    dense = s * (b.double().numpy() @ a.double().numpy())
    sv = np.linalg.svd(dense, compute_uv=False)
    r = a.shape[0]
    assert np.all(sv[r:] <= 1e-12 * max(sv[0], 1e-300)), "a rank-r product has at most r non-zero values"
    return np.concatenate([sv[:r], np.zeros(max(r - sv.size, 0))])


@given(n=st.integers(1, 40), k=st.integers(1, 40), r=st.integers(1, 12), deficient=st.integers(0, 3),
       scaling=st.floats(-8, 8).filter(lambda x: abs(x) > 1e-3), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_singular_values_equal_the_dense_svd(n, k, r, deficient, scaling, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=g).to(dtype)
    b = torch.randn(n, r, generator=g).to(dtype)
    if deficient and r > 1:  # repeated rows of A: a rank-deficient product
        a[-min(deficient, r - 1):] = a[0]
    sv = singular_values(a, b, scaling)
    ref = _dense_sv(a, b, scaling)
    assert sv.dtype == torch.float64 and sv.shape == (r,)
    assert torch.isfinite(sv).all()
    assert np.all(np.diff(sv.numpy()) <= 1e-12 * max(ref[0], 1e-300)), "descending"
    assert np.allclose(sv.numpy(), ref, rtol=0, atol=1e-10 * max(ref[0], 1e-300)), (sv, ref)


@given(sv=st.lists(st.floats(0, 100), min_size=1, max_size=16), top_k=st.integers(1, 20))
def test_spectrum_stats_against_a_direct_count(sv, top_k):
    sv = torch.tensor(sorted(sv, reverse=True), dtype=torch.float64)
    stats = spectrum_stats(sv, top_k)
    e = (sv * sv).numpy()
    if e.sum() == 0:
        assert stats["rank99"] == 0 and stats["effective_rank"] == 0
        return
    for frac, key in ((0.90, "rank90"), (0.99, "rank99")):
        # the fewest leading values whose energy reaches the fraction, found by trying each count
        want = next(c for c in range(1, len(e) + 1) if e[:c].sum() >= frac * e.sum() * (1 - 1e-12))
        assert stats[key] == want
    assert math.isclose(stats["energy_top_k"], e[:top_k].sum() / e.sum(), rel_tol=1e-12)
    p = sv.numpy() / sv.numpy().sum()
    p = p[p > 0]
    assert math.isclose(stats["effective_rank"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-9)
    assert 1 - 1e-9 <= stats["effective_rank"] <= len(sv) + 1e-9


def test_effective_rank_extremes():
    assert spectrum_stats(torch.ones(8, dtype=torch.float64), 4)["effective_rank"] == pytest.approx(8)
    one = spectrum_stats(torch.tensor([3.0, 0, 0, 0], dtype=torch.float64), 2)
    assert one["effective_rank"] == pytest.approx(1) and one["rank99"] == 1 and math.isinf(one["condition"])


def _peft_adapter(tmp_path, base, **kw):
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = tmp_path / "peft_adapter"
    pm.save_pretrained(str(out))
    return out


def test_cli_on_a_peft_adapter_with_base_json_and_plot(tmp_path, capsys):
    """A peft 0.21.2 adapter of a tiny Llama: every layer's spectrum equals the dense SVD, the
    relative norm equals |s B A|_F / |W|_F of the model's own weight, the plot is a PNG."""
    base = tiny_llama()
    adapter = _peft_adapter(tmp_path, base, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    base.save_pretrained(str(tmp_path / "base"), max_shard_size="100KB")
    assert len(Checkpoint(tmp_path / "base").files) > 1
    png = tmp_path / "spectrum.png"
    assert cli.main(["inspect", str(adapter), "--base", str(tmp_path / "base"), "--json", "--plot", str(png),
                     "--top-k", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    sd = safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))
    layers = {lr["path"]: lr for lr in report["layers"]}
    assert len(layers) == 6 and report["top_k"] == 3
    weights = {k: v.detach() for k, v in base.named_parameters()}
    for path, lr in layers.items():
        a, b = sd[f"base_model.model.{path}.lora_A.weight"], sd[f"base_model.model.{path}.lora_B.weight"]
        ref = _dense_sv(a, b, 2.0)
        assert np.allclose(lr["singular_values"], ref, rtol=0, atol=1e-10 * ref[0])
        dense = 2.0 * (b.double() @ a.double())
        want = float(dense.norm() / weights[path + ".weight"].double().norm())
        assert lr["relative_norm"] == pytest.approx(want, rel=1e-10)
        assert lr["flags"] == [] and lr["rank"] == 8
    assert report["suggested_rank"] == 8 and report["collapsed"] == []
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50 and float(img.std()) > 0
    missing = tmp_path / "no" / "dir" / "x.png"  # the error names the path given, not a temporary file
    assert cli.main(["inspect", str(adapter), "--plot", str(missing)]) != 0
    err = capsys.readouterr().err
    assert f"--plot {missing}: no directory {missing.parent}" in err and ".tmp" not in err


def _lowrank_adapter(tmp_path, model, rank, collapse_to=None, name="ad"):
    lowrank.patch_linear(model, rank=rank)
    randomize_lora_(model, std=0.3)
    if collapse_to is not None:  # B's columns beyond the first `collapse_to` nearly zero: rank collapse
        with torch.no_grad():
            for _, layer in lowrank.lora_layers(model):
                layer.lora_B["default"][:, collapse_to:] *= 1e-4
    lowrank.save_adapter(model, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("collapse_to", [None, 2])
def test_rank_collapse_is_flagged_only_where_it_happened(tmp_path, capsys, collapse_to):
    """GPT-2 (Conv1D layers, fan_in_fan_out) adapters written by lowrank: a full-rank one is not
    flagged and keeps r=8; one whose B has 2 live columns is flagged everywhere, and rank 2 is
    suggested. The text report says so."""
    model = tiny_gpt2()
    adapter = _lowrank_adapter(tmp_path, model, 8, collapse_to)
    report = inspect_adapter(adapter)
    assert report.layers and all(lr.rank == 8 for lr in report.layers)
    for lr in report.layers:
        want = _dense_sv(*(lambda layer: (layer.lora_A["default"].detach(), layer.lora_B["default"].detach(),
                                          layer.scaling("default")))(dict(lowrank.lora_layers(model))[lr.path]))
        assert np.allclose(lr.singular_values, want, rtol=0, atol=1e-10 * want[0])
    if collapse_to is None:
        assert all(lr.flags == [] for lr in report.layers) and report.suggested_rank == 8
    else:
        assert all(lr.flags == ["collapsed"] and lr.rank99 == 2 for lr in report.layers)
        assert report.suggested_rank == 2
    assert cli.main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert ("rank collapse in" in out) == (collapse_to is not None)
    assert f"suggested rank for the next run: {report.suggested_rank}" in out


def test_an_untrained_adapter_is_zero_not_collapsed(tmp_path):
    model = lowrank.patch_linear(tiny_llama(), rank=4)  # B = 0
    lowrank.save_adapter(model, tmp_path / "fresh")
    report = inspect_adapter(tmp_path / "fresh")
    assert all(lr.flags == ["zero"] and lr.norm == 0 for lr in report.layers)
    assert report.suggested_rank is None
    assert all(lr["condition"] is None for lr in report.to_json()["layers"])


def test_a_dora_adapter_reports_the_merged_change(tmp_path, capsys):
    """DoRA magnitudes were ignored (found by a new-user trial): a peft DoRA adapter with B = 0 and
    magnitudes 1.1 ||W_i|| was reported as untrained ("zero", no change), and with random B the
    ratio was |s B A| / |W| where the merge moves W by far less. Now: with the base, |dW|/|W| is the
    merged weight's change (against merge_and_unload, float64), B = 0 layers are "magnitude-only",
    the output says DoRA, and no rank is suggested from layers without a direction update."""
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.1)
    pm.save_pretrained(tmp_path / "scaled")
    report = inspect_adapter(tmp_path / "scaled", base=tmp_path / "base")
    assert all(lr.flags == ["magnitude-only"] and lr.dora for lr in report.layers)
    assert all(lr.relative_norm == pytest.approx(0.1, rel=1e-4) for lr in report.layers)
    assert report.suggested_rank is None
    assert cli.main(["inspect", str(tmp_path / "scaled")]) == 0
    out = capsys.readouterr().out
    assert "DoRA adapter" in out and "only --base can measure" in out
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "trained")
    report = inspect_adapter(tmp_path / "trained", base=tmp_path / "base")
    merged = copy.deepcopy(pm).merge_and_unload()
    weights, after = dict(base.named_parameters()), dict(merged.named_parameters())
    for lr in report.layers:
        w, w2 = weights[lr.path + ".weight"].double(), after[lr.path + ".weight"].double()
        assert lr.relative_norm == pytest.approx(float((w2 - w).norm() / w.norm()), rel=1e-4)
        assert lr.relative_norm < lr.norm / float(w.norm())  # not |s B A| / |W|


def test_base_with_another_prefix_is_resolved(tmp_path):
    """An adapter made on the bare LlamaModel (paths `layers.0...`) inspected against the
    LlamaForCausalLM checkpoint (keys `model.layers.0...`)."""
    full = tiny_llama()
    full.save_pretrained(str(tmp_path / "base"))
    bare = copy.deepcopy(full.model)
    adapter = _lowrank_adapter(tmp_path, bare, 4)
    report = inspect_adapter(adapter, base=tmp_path / "base")
    weights = {k: v.detach() for k, v in full.named_parameters()}
    for lr in report.layers:
        assert lr.path.startswith("layers.")
        w = weights["model." + lr.path + ".weight"]
        assert lr.relative_norm == pytest.approx(lr.norm / float(w.double().norm()), rel=1e-10)


def test_errors_are_one_line_and_exit_nonzero(tmp_path, capsys):
    adapter = _lowrank_adapter(tmp_path, tiny_llama(), 4)
    tiny_llama(hidden=32, intermediate=64).save_pretrained(str(tmp_path / "other"))
    tiny_gpt2().save_pretrained(str(tmp_path / "gpt2"))
    capsys.readouterr()  # transformers' progress bars
    for argv, words in ((["inspect", str(tmp_path / "nope")], "not a directory"),
                        (["inspect", str(adapter), "--base", str(tmp_path / "other")], "needs a dense (48, 96)"),
                        (["inspect", str(adapter), "--base", str(tmp_path / "gpt2")], "no weight for adapter layer"),
                        (["inspect", str(adapter), "--base", str(tmp_path)], "no config.json")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and err.startswith("lowrank inspect: error:"), err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    sd = safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))
    sd[next(k for k in sd if "lora_A" in k)] = torch.full((4, 48), math.nan)
    sd.pop(next(k for k in sd if "lora_B" in k))
    safetensors.torch.save_file(sd, str(bad / "adapter_model.safetensors"))
    assert cli.main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "missing" in err and err.count("\n") == 1


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "--top-k" in out and "(default: 4)" in out


def test_modules_to_save_and_embedding_layers_are_reported(tmp_path):
    from lowrank.inspect_adapter import inspect_adapter
    from tests.models import tiny_llama
    model = lowrank.patch_linear(tiny_llama(), r=4, target_modules=["embed_tokens", "q_proj"],
                                 modules_to_save=["lm_head"])
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            layer.lora_A["default"].normal_()
            layer.lora_B["default"].normal_()
    lowrank.save_adapter(model, tmp_path)
    report = inspect_adapter(tmp_path)
    emb = next(lr for lr in report.layers if lr.path == "model.embed_tokens")
    layer = model.model.embed_tokens
    dense = layer.scaling() * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
    torch.testing.assert_close(torch.tensor(emb.singular_values, dtype=torch.float64)[:4],
                               torch.linalg.svdvals(dense)[:4], rtol=1e-9, atol=1e-9)
    assert report.to_json()["modules_to_save"] == {"lm_head": model.lm_head.original_module.weight.numel()}
