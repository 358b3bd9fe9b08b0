"""QLoRA on models (lowrank/qlora.py and patch_linear(quantize="nf4")): quantizing the targeted
layers bit-exactly and one at a time, adopting bitsandbytes layers, training a Llama on both
backends, preparing a model for k-bit training, and the memory peak while patching."""
from __future__ import annotations

import importlib

import pytest
import torch

import lowrank
from lowrank.nf4_format import quantize_nf4
from lowrank.nf4_linear import NF4Linear
from lowrank.ops.lora_matmul import lora_linear_reference
from lowrank.qlora import quantized_layers

from tests import models
from tests.bnb_oracle import bnb_without_compile, make_bnb_linear, needs_bnb  # noqa: F401
from tests.helpers import assert_close, backends
from tests.oracles import lora_linear_f64

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def expected_nf4_bytes(numel, blocksize=64, double_quant=True):
    blocks = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4
    return (numel + 1) // 2 + 4 * blocks


def tiny_llama(seed=0):
    return models.tiny_llama(seed=seed, hidden=64, intermediate=128, vocab=128)


@pytest.mark.parametrize("backend", backends())
def test_qlora_llama_trains_and_only_lora_changes(backend, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    model = tiny_llama()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    lowrank.patch_linear(model, rank=8, alpha=16, quantize="nf4", compute_dtype=torch.float32)
    lowrank.prepare_for_qlora_training(model, gradient_checkpointing=False)
    layers = dict(quantized_layers(model))
    assert len(layers) == 14  # 7 projections x 2 layers; lm_head stays dense
    total_numel = total_bytes = 0
    for name, layer in layers.items():
        path = name.removesuffix(".base_layer")
        ref = quantize_nf4(dense[path], blocksize=64)
        assert torch.equal(layer.nf4.packed, ref.packed) and torch.equal(layer.nf4.absmax, ref.absmax)
        assert layer.nf4.nbytes == expected_nf4_bytes(dense[path].numel())
        total_numel += dense[path].numel()
        total_bytes += layer.nf4.nbytes
    assert 4.12 < 8 * total_bytes / total_numel < 4.2
    trainable_n, total_n = lowrank.trainable_parameters(model)
    lora_n = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable_n == lora_n
    assert total_n == sum(p.numel() for p in tiny_llama().parameters()) + lora_n
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stored = {n: {k: v.clone() for k, v in m.nf4.tensors().items()} for n, m in layers.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-2] in ("lora_A", "lora_B") for n, p in model.named_parameters()
                             if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    # 24 tokens (above the CPU's fused small-M path), 5 steps: ~3.6 s a step for the Triton kernels in
    # the interpreter, where 64 tokens and 8 steps took ~2 minutes
    ids = torch.randint(0, 128, (2, 12))
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed}, trainable={p.requires_grad}"
    for n, m in layers.items():
        for k, v in m.nf4.tensors().items():
            assert torch.equal(v, stored[n][k]), f"{n}.{k} changed"


def test_qlora_patch_matches_nf4_reference_forward():
    """Zero-initialised B: the patched model computes exactly x @ deq(W).T (+ bias) per layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False))
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    b0 = model[0].bias.detach().clone()
    old = model[0]
    lowrank.patch_linear(model, rank=4, targets=["0", "2"], quantize="nf4", compute_dtype=torch.float32)
    assert old.weight.numel() == 0, "the dense weight must be released"
    d0, d2 = quantize_nf4(w0).dequantize(torch.float32).double(), quantize_nf4(w2).dequantize(torch.float32).double()
    for m in (5, 40):  # the CPU's fused decode-and-multiply (M <= SMALL_M = 8) and its tiled decode + GEMM
        x = torch.randn(m, 64)
        h = model[1](model[0](x))
        ref_h = torch.nn.functional.linear(x.double(), d0, b0.double()).relu()
        assert (h.double() - ref_h).abs().max() <= 1e-5 * (1 + ref_h.abs().max())
        out = model[2](h)  # layer 2 against float64 on the same input: each layer rounds once
        ref = torch.nn.functional.linear(h.double(), d2)
        assert out.dtype == torch.float32 and not out.isnan().any()
        assert (out.double() - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_qlora_patch_errors_leave_model_unchanged():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"1.*NaN/Inf"):
        lowrank.patch_linear(model, rank=4, targets=["0", "1"], quantize="nf4")
    assert type(model[0]) is torch.nn.Linear and model[0].weight.numel() == 64 * 64
    with pytest.raises(ValueError, match="quantize"):
        lowrank.patch_linear(model, rank=4, targets=["0"], quantize="int4")
    with pytest.raises(ValueError, match="blocksize"):
        lowrank.patch_linear(model, rank=4, targets=["0"], quantize="nf4", blocksize=48)
    assert type(model[0]) is torch.nn.Linear


@needs_bnb
def test_adopts_bnb_linear4bit_without_requantizing():
    _, layer = make_bnb_linear(128, 48, double_quant=True)
    model = torch.nn.Sequential(layer)
    packed_ptr = layer.weight.data.data_ptr()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_bnb = layer(x)
    lowrank.patch_linear(model, rank=4, targets=["0"], compute_dtype=torch.float32)
    base = model[0].base_layer
    assert isinstance(base, NF4Linear) and base.nf4.packed.data_ptr() == packed_ptr
    # B = 0: LoRA adds exactly nothing; the product's summation order is ours (one fused pass on
    # the CPU), so it is held to bitsandbytes' own error against float64 on the same weight
    ref = torch.nn.functional.linear(x.double(), base.nf4.dequantize(torch.float32).double(),
                                     layer.bias.double() if layer.bias is not None else None)
    assert_close(model(x).detach(), ref, baseline=y_bnb)


@needs_bnb
@pytest.mark.parametrize("undo", ["unpatch", "merge_and_unload-other-adapter"])
def test_an_adopted_bnb_layer_goes_back_as_a_bnb_layer(undo):
    """unpatch (and merge_and_unload of an adapter the layer does not hold) puts a bitsandbytes
    Linear4bit back where one was adopted (it left lowrank's NF4Linear, which peft's "all-linear"
    does not adapt): bitsandbytes' class and compute dtype, the same codes, statistics and bias, and
    bitsandbytes' own forward, bit for bit as before patching."""
    _, layer = make_bnb_linear(128, 48, double_quant=True)
    model = torch.nn.Sequential(layer, torch.nn.Linear(48, 8))
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = model(x)
    state0 = {k: v.clone() for k, v in layer.state_dict().items()}
    if undo == "unpatch":
        lowrank.patch_linear(model, rank=4, targets=["0"], compute_dtype=torch.float32)
        lowrank.unpatch(model)
    else:
        lowrank.patch_linear(model, rank=4, targets=["0", "1"], compute_dtype=torch.float32)
        lowrank.add_adapter(model, "other", rank=2, targets=["1"], set_active=True)
        model = lowrank.merge_and_unload(model, adapter_name="other")
    back = model[0]
    assert type(back) is type(layer) and back.compute_dtype == layer.compute_dtype
    assert back.bias is layer.bias and not back.weight.requires_grad
    state = back.state_dict()
    assert state.keys() == state0.keys() and all(torch.equal(state[k], v) for k, v in state0.items())
    with torch.no_grad():
        torch.testing.assert_close(back(x), layer(x), rtol=0, atol=0)
        if undo == "unpatch":
            assert torch.equal(model(x), y0)


@needs_bnb
def test_merge_and_unload_failing_to_rebuild_a_bnb_layer_leaves_the_model_as_it_was(monkeypatch):
    """merge_and_unload builds the bitsandbytes layer it puts back (NF4Linear.to_bnb) before it merges
    any dense layer: a failure there (out of memory, here injected) leaves every layer unmerged,
    patched and computing what it did (it used to leave the dense layers merged and flagged)."""
    from lowrank.nf4_linear import NF4Linear

    _, layer = make_bnb_linear(128, 48, double_quant=True)
    model = torch.nn.Sequential(layer, torch.nn.Linear(48, 8))
    lowrank.patch_linear(model, rank=4, targets=["0", "1"], compute_dtype=torch.float32)
    lowrank.add_adapter(model, "other", rank=2, targets=["1"], set_active=True)
    with torch.no_grad():
        model[1].lora_B["other"].normal_()
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = model(x)
    w0 = model[1].base_layer.weight.detach().clone()

    def fail(self):
        raise MemoryError("injected")

    monkeypatch.setattr(NF4Linear, "to_bnb", fail)
    with pytest.raises(MemoryError, match="injected"):
        lowrank.merge_and_unload(model, adapter_name="other")
    assert not model[1].merged and torch.equal(model[1].base_layer.weight, w0)
    assert isinstance(model[0].base_layer, NF4Linear)
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_qlora_llama_triton_path_matches_reference(monkeypatch):
    """The patched model through the Triton kernels (interpreter here) gives the reference's loss
    and LoRA gradients."""
    model = tiny_llama().to(DEV)
    lowrank.patch_linear(model, rank=4, quantize="nf4", compute_dtype=torch.float32, init="gaussian")
    with torch.no_grad():
        for _, m in lowrank.lora_layers(model):
            m.lora_B["default"].normal_(0, 0.05)  # non-zero B so the LoRA branch counts
    ids = torch.randint(0, 128, (2, 8), device=DEV)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("LOWRANK_BACKEND", backend)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (l_ref, g_ref), (l_tri, g_tri) = results["reference"], results["triton"]
    assert torch.allclose(l_tri, l_ref, rtol=1e-5, atol=1e-5), (l_tri, l_ref)
    for a, b in zip(g_tri, g_ref):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * b.abs().max().item() + 1e-8)


def test_quantize_an_already_patched_model_keeps_adapters():
    """patch_linear(quantize="nf4") on a dense LoRA model quantizes the bases under the existing
    adapters (GPT-2 Conv1D included: NF4 stores (out, in))."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # weight (in=64, out=48)
    model = torch.nn.Sequential(conv)
    w_nk = conv.weight.detach().t().clone()
    lowrank.patch_linear(model, rank=4, targets=["0"], adapter_name="first")
    with torch.no_grad():
        model[0].lora_B["first"].normal_()
    a, b = model[0].lora_A["first"].detach().clone(), model[0].lora_B["first"].detach().clone()
    lowrank.patch_linear(model, rank=4, targets=["0"], adapter_name="second", quantize="nf4",
                         compute_dtype=torch.float32)
    layer = model[0]
    assert isinstance(layer.base_layer, NF4Linear) and not layer.fan_in_fan_out
    assert torch.equal(layer.base_layer.nf4.packed, quantize_nf4(w_nk).packed)
    layer.active_adapter = "first"
    x = torch.randn(3, 64)
    ref = lora_linear_f64(x, quantize_nf4(w_nk).dequantize(torch.float32), a, b, layer.scaling("first"),
                                    conv.bias)
    assert_close(model(x), ref, lora_linear_reference(x, quantize_nf4(w_nk).dequantize(torch.float32), a, b,
                                                      layer.scaling("first"), conv.bias))


def test_prepare_for_qlora_training_checkpointing_same_grads():
    """Norms go to fp32; with gradient checkpointing (inputs made to require grad) the LoRA
    gradients equal those without it."""
    grads = []
    for gc in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        lowrank.patch_linear(model, rank=4, quantize="nf4", compute_dtype=torch.float32, init="gaussian")
        lowrank.prepare_for_qlora_training(model, gradient_checkpointing=gc)
        norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
        assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            for _, m in lowrank.lora_layers(model):
                m.lora_B["default"].fill_(0.01)
        model.train()
        ids = torch.arange(16).view(2, 8)
        model(input_ids=ids, labels=ids).loss.backward()
        g = [p.grad for n, p in model.named_parameters() if p.requires_grad]
        assert all(x is not None and torch.isfinite(x).all() and (x != 0).any() for x in g)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-6)


def test_patch_quantize_frees_each_dense_weight_before_the_next():
    """patch_linear(quantize="nf4") on CPU: when layer i is quantized, the dense weights of layers
    0..i-1 are already freed (even though this test still refers to them), so the peak stays near
    one dense layer beyond the result."""
    Q = importlib.import_module("lowrank.nf4_linear")  # NF4Linear.from_linear quantizes through it

    d, layers = 256, 5
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)])
    dense = [lin.weight for lin in model]  # outside references: must not keep the memory alive
    layer_bytes = d * d * 4
    alive_at_call = []
    real = Q.quantize_nf4

    def spy(weight, *args, **kwargs):
        alive_at_call.append(sum(p.untyped_storage().nbytes() for p in dense))
        return real(weight, *args, **kwargs)

    Q.quantize_nf4 = spy
    try:
        lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4")
    finally:
        Q.quantize_nf4 = real
    # call i sees layers i..L-1 still dense (the input), never one more
    assert alive_at_call == [(layers - i) * layer_bytes for i in range(layers)], alive_at_call
    assert all(p.untyped_storage().nbytes() == 0 for p in dense)
    assert len(list(quantized_layers(model))) == layers


@pytest.mark.gpu
def test_patch_peak_memory_one_layer():
    """Quantizing while patching: peak memory stays near one dense layer above the final model."""
    layers, d = 8, 4096
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    lowrank.patch_linear(model, rank=16, targets="all-linear", quantize="nf4")
    torch.cuda.synchronize()
    peak, end = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    layer = d * d * 2
    assert end < start / 3  # 4-bit + LoRA instead of bf16
    # the dense model itself is freed as we go: the peak never exceeds the start
    assert peak <= start + 1.5 * layer, (peak - start) / layer


_PEAK_SCRIPT = r"""
import gc, torch, lowrank
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
d, layers = 2048, 6
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to(torch.bfloat16)
lowrank.quantize_nf4(torch.randn(64, 64))  # the code tables, built once
gc.collect()
start = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM (the peak) to the current RSS
lowrank.patch_linear(model, rank=16, targets="all-linear", quantize="nf4")
print((rss("VmHWM:") - start) / (d * d * 2))
"""


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU test_patch_peak_memory_one_layer measures the CUDA allocator")
def test_patch_quantize_peak_memory_cpu():
    """patch_linear(quantize="nf4") on the CPU: the process's peak resident memory while patching
    stays within 1.25 dense layers above the start (16M-element quantization chunks peaked at 6.5).
    A fixed glibc mmap threshold makes freed tensors leave RSS at once, so the peak counts live
    bytes, not the allocator's cache."""
    import os
    import subprocess
    import sys

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_layers = float(proc.stdout.strip().splitlines()[-1])
    assert peak_layers <= 1.25, f"peak {peak_layers:.2f} dense layers above the start"


@pytest.mark.parametrize("bad, error", [("huge", "double_quant=False"), ("nan", "NaN/Inf")])
def test_patch_quantize_checks_every_layer_before_the_first_swap(bad, error):
    """A layer that cannot be quantized, behind layers that can: refused before the first swap, the
    model exactly as it was. (Block maxima near float32's largest value raised IndexError from the
    nested quantizer after the layers before them were converted and their dense weights freed.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    with torch.no_grad():
        if bad == "huge":
            model[2].weight.div_(model[2].weight.abs().max()).mul_(3e38)
        else:
            model[2].weight[5, 7] = float("nan")
    layers = list(model)
    bits = [m.weight.detach().view(torch.int32).clone() for m in model]  # NaN-proof comparison
    with pytest.raises(ValueError, match=rf"quantize layer 2: .*{error}"):
        lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4")
    assert list(model) == layers and all(type(m) is torch.nn.Linear for m in model)
    assert all(torch.equal(m.weight.detach().view(torch.int32), b) for m, b in zip(model, bits))
    assert all(m.weight.requires_grad for m in model)


def test_patch_quantize_subnormal_layer_as_bitsandbytes_does():
    """A layer of subnormal values quantizes (bitsandbytes does too), exactly as quantize_nf4 does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(1e-40 / model[1].weight.abs().max())
    w1 = model[1].weight.detach().clone()
    lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4")
    q = model[1].base_layer.nf4
    ref = quantize_nf4(w1)
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.absmax, ref.absmax)


def test_patch_quantize_failing_midway_says_what_state_the_model_is_in(monkeypatch):
    """A failure after the first swap (out of memory) cannot be undone exactly (the dense weights are
    freed): the error says which layers are converted and which are not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    dense = [m.weight.detach().clone() for m in model]
    real, calls = NF4Linear.from_linear, []

    def flaky(*args, **kwargs):
        if len(calls) == 2:
            raise MemoryError("simulated out of memory")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(NF4Linear, "from_linear", flaky)
    with pytest.raises(MemoryError, match="simulated") as err:
        lowrank.patch_linear(model, rank=4, targets="all-linear", quantize="nf4")
    note = " ".join(getattr(err.value, "__notes__", []))
    assert "stopped after 2 of 4 layers: 0, 1 are NF4Linear now" in note and "2, 3 are unchanged" in note, note
    assert [type(m).__name__ for m in model] == ["NF4Linear", "NF4Linear", "Linear", "Linear"]
    assert torch.equal(model[2].weight, dense[2]) and torch.equal(model[3].weight, dense[3])
    assert not list(lowrank.lora_layers(model))


@needs_bnb
def test_adopted_bnb_layer_keeps_its_compute_dtype():
    """A bitsandbytes Linear4bit computing in float32 stays in float32 when adopted (patch_linear's
    bfloat16 default used to override it: outputs off by ~0.03), unless a compute_dtype is given."""
    _, layer = make_bnb_linear(128, 48, double_quant=True)
    assert layer.compute_dtype == torch.float32
    x = torch.randn(3, 128)
    with torch.no_grad():
        y_bnb = layer(x)
    model = torch.nn.Sequential(layer)
    lowrank.patch_linear(model, rank=4, targets=["0"])
    assert model[0].base_layer.compute_dtype == torch.float32
    out = model(x).detach()
    assert out.dtype == torch.float32
    ref = torch.nn.functional.linear(x.double(), model[0].base_layer.nf4.dequantize(torch.float32).double(),
                                     layer.bias.double() if layer.bias is not None else None)
    assert_close(out, ref, baseline=y_bnb)  # off by ~0.03 in bfloat16, which this would catch
    _, other = make_bnb_linear(128, 48, double_quant=True)
    lowrank.patch_linear(torch.nn.Sequential(other), rank=4, targets=["0"], compute_dtype=torch.bfloat16)
