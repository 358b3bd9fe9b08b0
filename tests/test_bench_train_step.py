"""bench/bench_train_step.py on a tiny Llama: every method and implementation measured with its
memory and sizes, and an implementation whose step-0 loss is not the base model's is reported as
failed and never timed."""
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from bench import bench_train_step as B  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=32)
    monkeypatch.setattr(B, "_config", lambda device: (config, (2, 16)))
    timed = []
    real = B.bench
    monkeypatch.setattr(B, "bench", lambda fn, inputs, **kw: timed.append(1) or real(fn, inputs, **kw))
    return timed


def test_every_method_and_impl_with_its_figures(tiny):
    recs = {(r.op, r.impl): r for r in B.run(quick=True, device="cpu")}
    assert set(recs) == {("train_step.full", "torch"), ("train_step.lora", "lowrank"), ("train_step.lora", "peft"),
                         ("train_step.qlora", "lowrank"), ("train_step.qlora", "peft+bnb")}
    for (op, impl), r in recs.items():
        assert math.isfinite(r.median_s) and r.median_s > 0 and r.derived["tokens/s"] > 0, (op, impl, r.extra)
        e = r.extra
        assert e["peak_bytes"] > e["optimizer_bytes"] > 0 and e["checkpoint_bytes"] > 0 and e["trainable"] > 0
    lora, full = recs[("train_step.lora", "lowrank")].extra, recs[("train_step.full", "torch")].extra
    assert lora["trainable"] == recs[("train_step.lora", "peft")].extra["trainable"] < full["trainable"]
    assert 0 <= lora["optimizer_bytes"] - 8 * lora["trainable"] <= 4 * 64  # AdamW: two fp32 moments + step scalars
    assert len(tiny) == 5


def test_a_wrong_step0_loss_is_failed_and_never_timed(tiny, monkeypatch):
    monkeypatch.setattr(B, "_reference_loss", lambda method, base, ids, device: 123.0)
    recs = [r for r in B.run(quick=True, device="cpu") if r.op != "train_step.full"]
    assert recs and all(math.isnan(r.median_s) and "!= base model's 123.0" in r.extra["error"] for r in recs)
    assert len(tiny) == 1  # only full fine-tuning (which has no step-0 check) was timed
