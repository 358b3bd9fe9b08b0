"""lowrank.summary (lowrank/summary.py): peft's print_trainable_parameters() line and the per adapter /
per target tables, against peft and against the model's own tensors."""
import pytest
import torch

import lowrank
from tests.models import tiny_llama


def test_summary_line_is_pefts_and_tables_count_what_the_model_holds(capsys):
    """The first line is print_trainable_parameters()'s, digit for digit, for the same model and
    config; per adapter and per target the counts are the factors' and weights' own."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    model = tiny_llama()
    lowrank.patch_linear(model, r=4, target_modules=["q_proj", "v_proj"])
    s = lowrank.summary(model)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == peft_line == s.peft_line()
    assert "adapters" in printed and "q_proj" in printed
    lowrank.add_adapter(model, "other", r=8, target_modules=["v_proj"])
    s = lowrank.summary(model, print_summary=False)
    assert capsys.readouterr().out == ""
    layers = dict(lowrank.lora_layers(model))
    by_name = {a.name: a for a in s.adapters}
    assert by_name["default"].active and by_name["default"].trainable and not by_name["other"].trainable
    assert by_name["other"].ranks == [8] and by_name["other"].layers == 2
    assert by_name["other"].params == sum(m.lora_A["other"].numel() + m.lora_B["other"].numel()
                                          for m in layers.values() if "other" in m.configs)
    v = next(t for t in s.targets if t.name == "v_proj")
    assert v.layers == 2 and v.base_params == sum(m.base_layer.weight.numel() for p, m in layers.items()
                                                   if p.endswith("v_proj"))
    assert s.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "other" in str(s) and s.peft_line() in str(s)


def test_summary_counts_nf4_weights_as_elements_and_their_bytes_as_stored():
    model = tiny_llama()
    dense = sum(p.numel() for p in model.parameters())
    lowrank.patch_linear(model, r=4, target_modules=["q_proj"], quantize="nf4", compute_dtype=torch.float32)
    s = lowrank.summary(model, print_summary=False)
    lora = sum(m.lora_A["default"].numel() + m.lora_B["default"].numel() for _, m in lowrank.lora_layers(model))
    assert s.total == dense + lora and s.trainable == lora
    q = s.targets[0]
    assert q.nf4 and q.base_bytes == sum(m.base_layer.nf4.nbytes for _, m in lowrank.lora_layers(model))
    assert q.base_bytes < q.base_params  # 4 bits and the scales: about half a byte per element
