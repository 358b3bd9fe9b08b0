"""Many adapters on one model: add / set / delete / disable, torch.compile without recompiles,
and mixed-adapter batches through a real (tiny) transformers model."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank
from lowrank.backend import triton_available
from tests.helpers import assert_close, assert_close_rows, backends
from tests.models import SMALL_MODELS, ids, logits, randomize_B_, small_llama, tiny_llama
from tests.oracles import sgmv_f64
from tests.oracles import merged_f64

RANKS = {"a": 4, "b": 8, "c": 64}


def three_adapters(arch="llama"):
    """A model with adapters a (r=4), b (r=8, rsLoRA, q/v only) and c (r=64), B randomized."""
    base = SMALL_MODELS[arch]()
    model = copy.deepcopy(base)
    lowrank.add_adapter(model, "a", rank=4, alpha=8)
    lowrank.add_adapter(model, "b", rank=8, alpha=4, rslora=True,
                        targets=["q_proj", "v_proj"] if arch == "llama" else ["c_attn"])
    lowrank.add_adapter(model, "c", rank=64, alpha=16)
    randomize_B_(model, std=0.2)
    return base, model


def run_on(model, name, fn, trainable=True):
    """fn() with every layer on adapter `name` alone (None: the base model, adapters disabled)."""
    if name is None:
        with lowrank.disable_adapters(model):
            return fn()
    lowrank.set_adapter(model, name, trainable=trainable)
    return fn()


def train_every_adapter_(model):
    """Ask for every adapter's factors to be trainable (peft's rule trains the active one only)."""
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)


def test_set_adapter_switches_without_reallocating():
    base, model = three_adapters()
    x = ids()
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    modules = [id(m) for m in model.modules()]
    outs = {}
    for name in ["a", "b", "c", "a"]:
        lowrank.set_adapter(model, name)
        outs[name] = logits(model, x)
        assert_close(outs[name], logits(merged_f64(model, name), x), logits(merged_f64(model, name).float(), x))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    assert [id(m) for m in model.modules()] == modules
    assert not torch.allclose(outs["a"], outs["b"])
    # "b" targets q/v only: every other layer runs its base layer while "b" is active.
    lowrank.set_adapter(model, "b")
    assert all(layer.active_adapter == ("b" if "b" in layer.configs else None)
               for _, layer in lowrank.lora_layers(model))


def test_disable_adapters_gives_base_and_restores_state():
    base, model = three_adapters()
    x = ids()
    lowrank.set_adapter(model, "b")
    before = {p: layer.active_adapter for p, layer in lowrank.lora_layers(model)}
    with_b = logits(model, x)
    with lowrank.disable_adapters(model):
        assert torch.equal(logits(model, x), logits(base, x))
    assert {p: layer.active_adapter for p, layer in lowrank.lora_layers(model)} == before
    assert torch.equal(logits(model, x), with_b)
    with pytest.raises(RuntimeError, match="boom"):
        with lowrank.disable_adapters(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, x), with_b)


def test_delete_adapter():
    base, model = three_adapters()
    lowrank.set_adapter(model, "c")
    x = ids()
    lowrank.delete_adapter(model, "c")
    assert lowrank.adapter_names(model) == ["a", "b"]
    assert not any("lora_A.c" in n or "lora_B.c" in n for n, _ in model.named_parameters())
    # The active adapter falls back to each layer's first remaining one ("a" everywhere).
    assert {layer.active_adapter for _, layer in lowrank.lora_layers(model)} == {"a"}
    assert_close(logits(model, x), logits(merged_f64(model, "a"), x), logits(merged_f64(model, "a").float(), x))
    for _, layer in lowrank.lora_layers(model):  # the index buffer follows the shifted positions
        assert int(layer._active_index) == list(layer.configs).index(layer.active_adapter)
    with pytest.raises(ValueError, match=r"no adapter 'c'.*\['a', 'b'\]"):
        lowrank.set_adapter(model, "c")
    with pytest.raises(ValueError, match="no adapter 'zz'"):
        lowrank.delete_adapter(model, "zz")


ROWS = ["a", None, "c", "b", "a", "c", None]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", backends())
def test_mixed_batch_rows_equal_their_adapter(arch, backend, monkeypatch):
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    base, model = three_adapters(arch)
    x = ids(rows=len(ROWS), seq=5)
    with lowrank.adapter_ids(model, ROWS):
        mixed = logits(model, x)
    for row, name in enumerate(ROWS):
        lowrank.set_adapter(model, name) if name else None
        ctx = lowrank.disable_adapters(model) if name is None else _null()
        with ctx:
            own = logits(model, x[row:row + 1])[0]
        ref = logits(merged_f64(model, name), x[row:row + 1])[0]
        assert_close(mixed[row], ref, own, name=f"row {row} ({name})")
    # the same with integer ids and a tensor
    names = lowrank.adapter_names(model)
    t = torch.tensor([names.index(n) if n else -1 for n in ROWS])
    with lowrank.adapter_ids(model, t):
        again = logits(model, x)
    assert torch.equal(again, mixed)
    assert all(layer._adapter_ids is None for _, layer in lowrank.lora_layers(model))


def test_mixed_batch_casts_another_float_dtype_as_the_plain_forward_does():
    """A bf16 input to fp32 LoRA layers: the plain forward computes in the weight's dtype (the input
    cast), so must a mixed batch; it raised torch's "mat1 and mat2 must have the same dtype". Each
    row equals its adapter run alone on the same input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    lowrank.patch_linear(model, rank=4, targets=["0", "2"])
    lowrank.patch_linear(model, rank=4, targets=["0", "2"], adapter_name="b")
    with torch.no_grad():
        for _, layer in lowrank.lora_layers(model):
            for name in ("default", "b"):
                layer.lora_B[name].normal_()
    x = torch.randn(3, 16).bfloat16()
    names = ["default", "b", None]
    with torch.no_grad(), lowrank.adapter_ids(model, names):
        mixed = model(x)
    assert mixed.dtype == torch.float32
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lowrank.disable_adapters(model):
                    own = model(x[row:row + 1])
            else:
                lowrank.set_adapter(model, name)
                own = model(x[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], own, rtol=1e-6, atol=1e-6, msg=f"row {row} ({name})")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("backend", backends())
def test_mixed_batch_gradients(backend, monkeypatch):
    """Training several adapters in one batch: each adapter's gradient equals the gradient of its own
    rows run alone; an adapter no row used gets none."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    base, model = three_adapters()
    lowrank.add_adapter(model, "unused", rank=2)
    train_every_adapter_(model)  # several adapters trained in one batch: asked for
    rows = ["a", "c", None, "a", "b"]
    x = ids(rows=len(rows), seq=4)
    w = torch.randn(len(rows), 4, 61)  # a loss that weights every logit differently

    def loss_of(m, xs, ws):
        return (m(input_ids=xs).logits * ws).sum()

    model.zero_grad()
    with lowrank.adapter_ids(model, rows):
        loss_of(model, x, w).backward()
    mixed = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters() if p.requires_grad}

    ref_model = copy.deepcopy(model).double()  # float64 oracle: the reference mixed path
    ref_model.zero_grad()
    monkeypatch.setenv("LOWRANK_BACKEND", "reference")
    with lowrank.adapter_ids(ref_model, rows):
        loss_of(ref_model, x, w.double()).backward()
    ref = dict(ref_model.named_parameters())

    for name in ["a", "b", "c"]:
        sel = [i for i, r in enumerate(rows) if r == name]
        alone = copy.deepcopy(model)
        alone.zero_grad()
        lowrank.set_adapter(alone, name)
        loss_of(alone, x[sel], w[sel]).backward()
        for n, p in alone.named_parameters():
            if f".{name}" in n and p.requires_grad:
                r64 = ref[n].grad
                # The eager single-adapter path is an independent computation of the same gradient.
                assert (p.grad.double() - r64).abs().max() <= 1e-4 * r64.abs().max() + 1e-6, n
                assert_close(mixed[n], r64, p.grad, name=n)
    for n, g in mixed.items():
        if ".unused" in n:
            assert g is None or not g.any(), f"{n} got a gradient"


def test_mixed_batch_dropout_per_adapter():
    model = nn.Sequential(nn.Linear(40, 30))
    lowrank.add_adapter(model, "drop", rank=4, dropout=0.5)
    lowrank.add_adapter(model, "keep", rank=8)
    randomize_B_(model)
    x = torch.randn(6, 5, 40)
    rows = ["drop", "keep", None, "drop", "keep", None]
    with torch.no_grad():
        with lowrank.adapter_ids(model, rows):
            model.eval()
            ev = model(x)
            model.train()
            tr = model(x)
    for i, name in enumerate(rows):
        if name == "drop":
            assert not torch.allclose(tr[i], ev[i]), "dropout 0.5 must change the LoRA branch in training"
        else:
            assert torch.equal(tr[i], ev[i]), f"row {i} ({name}) has no dropout"


def test_mixed_batch_errors():
    base, model = three_adapters()
    x = ids(rows=3, seq=4)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        with lowrank.adapter_ids(model, ["a", "zz", None]):
            pass
    with pytest.raises(ValueError, match="adapter_ids has 2 entries.*3 rows"):
        with lowrank.adapter_ids(model, ["a", "b"]):
            model(input_ids=x)
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="adapter_ids has 2 entries.*7 rows"):
        with lowrank.adapter_ids(model, ["a", "b"]):
            layer(torch.randn(7, 32))
    with pytest.raises(ValueError, match="adapter_ids has 2 entries.*6 rows"):
        with lowrank.adapter_ids(model, ["a", None]):  # (rows * seq, K) cannot be told from 6 rows: refused
            layer(torch.ones(6, 32))
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 3\)"):
        with lowrank.adapter_ids(model, torch.tensor([0, 5, -1])):
            pass
    with pytest.raises(TypeError, match="one adapter name"):
        with lowrank.adapter_ids(model, "a"):
            pass
    with lowrank.adapter_ids(model, ["a", "b", "c"]):
        with pytest.raises(RuntimeError, match="already inside"):
            with lowrank.adapter_ids(model, ["a", "b", "c"]):
                pass
    assert all(layer._adapter_ids is None for _, layer in lowrank.lora_layers(model))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        with lowrank.adapter_ids(small_llama(), [None]):
            pass


def test_adapter_names_follow_peft():
    """Names as peft takes them ("sft-v2", "v1 final"): any printable name but one holding '.' (a
    ModuleDict key), '/' or '\\' (a subfolder of a multi-adapter save) or surrounding spaces."""
    model = small_llama()
    for name in ("sft-v2", "v1 final", "日本"):
        lowrank.add_adapter(model, name, rank=2)
    assert lowrank.adapter_names(model) == ["sft-v2", "v1 final", "日本"]
    for name in ("a.b", "a/b", "a\\b", "", " a", "a\n"):
        with pytest.raises(ValueError, match="adapter_name must be"):
            lowrank.add_adapter(model, name, rank=2)
    assert lowrank.adapter_names(model) == ["sft-v2", "v1 final", "日本"]


def test_compile_switching_does_not_recompile():
    """torch.compile (aot_eager backend: dynamo guards and AOT autograd are what decide recompiles;
    inductor's C++ codegen would cost ~a minute on this CPU and changes nothing about guards).
    set_adapter(trainable=False) leaves the requires_grad flags, which dynamo guards on, alone."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    lowrank.add_adapter(model, "a", rank=4)
    lowrank.add_adapter(model, "b", rank=8, rslora=True)
    randomize_B_(model)
    train_every_adapter_(model)  # asked: switching then leaves every requires_grad flag alone
    x = torch.randn(3, 5, 16)
    expect = {}
    for name in ["a", "b", None]:
        expect[name] = run_on(model, name, lambda: model(x).detach(), trainable=False)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ["a", "b", "a", None, "b"]:
            got = run_on(model, name, lambda: compiled(x), trainable=False)
            assert_close(got, expect[name].double(), expect[name], name=str(name))
        compiled(x).square().sum().backward()
    assert counter.frame_count == 1
    # Mixed batches through the compiled model: entering adapter_ids the first time compiles once
    # more (the ids attribute goes from None to a tensor); other ids then reuse that graph.
    for j, rows in enumerate((["b", None, "a"], [None, "a", "a"], ["b", "b", None])):
        with torch._dynamo.config.patch(error_on_recompile=j > 0), lowrank.adapter_ids(model, rows):
            got = compiled(x)
        for i, name in enumerate(rows):
            assert_close(got[i], expect[name][i].double(), expect[name][i], name=f"compiled mixed row {i}")
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["0.lora_A.b"].any() and not grads["0.lora_A.a"].any()


def test_a_mixed_batch_entered_under_inference_mode():
    """adapter_ids entered inside torch.inference_mode makes an inference tensor of ids, which has no
    version counter: the metadata cache keyed by it raised on the first forward (found by a new-user
    trial). Such ids are not cached; rows equal each adapter alone."""
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    lowrank.add_adapter(model, "a", rank=4)
    lowrank.add_adapter(model, "b", rank=8)
    randomize_B_(model)
    x = torch.randn(3, 5, 16)
    rows = ["b", None, "a"]
    expect = {name: run_on(model, name, lambda: model(x).detach(), trainable=False) for name in ("a", "b", None)}
    with torch.inference_mode():
        with lowrank.adapter_ids(model, rows):
            got = model(x)
            again = model(x)
    assert torch.equal(got, again)
    for i, name in enumerate(rows):
        assert_close(got[i], expect[name][i].double(), expect[name][i], name=f"row {i}")


@pytest.mark.gpu
def test_cuda_graph_mixed_batch_model():
    """A model's mixed-batch forward captured in a CUDA graph, replayed with ids changed in place."""
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64)).cuda()
    for name, r in RANKS.items():
        lowrank.add_adapter(model, name, rank=r)
    randomize_B_(model, std=0.1)
    x = torch.randn(4, 9, 64, device="cuda")
    gids = torch.tensor([0, -1, 2, 1], device="cuda")
    outs = []
    with torch.no_grad(), lowrank.adapter_ids(model, gids):
        model(x)  # warm-up: kernels compiled, tables cached
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        replays = ([2, 2, -1, 0], [1, 0, 1, -1])
        for new in replays:
            gids.copy_(torch.tensor(new))
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
    names = lowrank.adapter_names(model)
    for new, got in zip(replays, outs):
        for row, i in enumerate(new):
            name = None if i < 0 else names[i]
            ref = merged_f64(model, name)(x[row].double())
            with torch.no_grad():
                own = run_on(model, name, lambda: model(x[row]))
            assert_close(got[row], ref, own, name=f"replay row {row} ({name})")


def test_merged_model_disable_set_and_delete():
    """disable_adapters on a merged model runs the base weights inside and re-merges on exit, bit
    for bit; switching or deleting the merged adapter is refused with nothing changed."""
    model = small_llama()
    x = ids()
    base = logits(model, x)
    lowrank.patch_linear(model, rank=4)
    lowrank.add_adapter(model, "b", rank=8)
    randomize_B_(model)
    lowrank.merge(model)
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with lowrank.disable_adapters(model):
        assert torch.equal(logits(model, x), base)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, merged_weights[n]), n
    with pytest.raises(ValueError, match="merged"):
        lowrank.set_adapter(model, "b")
    with pytest.raises(ValueError, match="merged"):
        lowrank.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="merged"):  # refused before any layer runs
        with lowrank.adapter_ids(model, ["default", "b"]):
            pass
    assert all(layer._adapter_ids is None for _, layer in lowrank.lora_layers(model))
    assert all(layer.active_adapter == "default" and set(layer.configs) == {"default", "b"}
               for _, layer in lowrank.lora_layers(model))
    lowrank.unmerge(model)
    with lowrank.disable_adapters(model):
        assert torch.equal(logits(model, x), base)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_every_weight_update_reaches_the_next_mixed_batch(monkeypatch):
    """The Triton mixed path reads each adapter's own tensors in place: every way the weights can
    change (an optimizer-style in-place update, an edit through `.data` that version counters do
    not see, a `.data` swap, a load-style copy_, adding or deleting an adapter) reaches the next
    forward. (A packed copy cached on version counters missed the `.data` edit.)"""
    monkeypatch.setenv("LOWRANK_BACKEND", "triton")
    model = nn.Sequential(nn.Linear(40, 30))
    lowrank.add_adapter(model, "a", rank=4, alpha=8)
    lowrank.add_adapter(model, "b", rank=16)
    randomize_B_(model, std=0.3)
    layer = model[0]
    x = torch.randn(6, 40)
    rows = ["a", "b", None, "b", "a", "a"]

    def check(what):
        with torch.no_grad(), lowrank.adapter_ids(model, rows):
            got = model(x)
        names = list(layer.configs)
        tid = torch.tensor([names.index(r) if r in names else -1 for r in rows])
        As, Bs = [layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names]
        scal = [layer.configs[n].scaling for n in names]
        ref = sgmv_f64(x, layer.base_layer(x).detach(), tid, As, Bs, scal)
        plain = sgmv_f64(x, layer.base_layer(x).detach(), tid, As, Bs, scal).float()
        assert_close_rows(got, ref, plain, name=what)
        return got

    first = check("first call")
    with torch.no_grad():
        layer.lora_B["a"].add_(0.5)  # what an optimizer step does
    assert not torch.equal(check("in-place update"), first)
    before = check("unchanged")
    layer.lora_B["b"].data.mul_(2.0)  # invisible to version counters
    assert not torch.equal(check(".data edit"), before)
    layer.lora_A["b"].data = torch.randn(16, 40)
    check(".data swap")
    with torch.no_grad():
        layer.lora_A["a"].copy_(torch.randn(4, 40))
    check("copy_")
    lowrank.add_adapter(model, "c", rank=8)
    with torch.no_grad():
        layer.lora_B["c"].normal_()
    rows[2] = "c"
    check("added adapter")
    lowrank.delete_adapter(model, "b")
    rows = [r if r != "b" else None for r in rows]
    check("deleted adapter")


@pytest.mark.parametrize("backend", backends())
def test_mixed_batch_on_qlora_model(backend, monkeypatch):
    """NF4 base layers keep fp32 adapters inside a bf16 model: a mixed batch runs the LoRA part in the
    adapters' dtype and returns the model's dtype; each row matches its adapter's float64 oracle as
    closely as the single-adapter QLoRA path does (the fused NF4 kernels on the Triton backend)."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    model = tiny_llama(0, torch.bfloat16)
    lowrank.patch_linear(model, rank=8, quantize="nf4", compute_dtype=torch.bfloat16)
    lowrank.add_adapter(model, "b", rank=4, alpha=8, targets=["q_proj", "v_proj"])
    randomize_B_(model, std=0.1)
    rows = ["default", "b", None]
    x = torch.randint(0, 97, (3, 5))
    with lowrank.adapter_ids(model, rows):
        mixed = logits(model, x)
    assert mixed.dtype == torch.bfloat16
    for row, name in enumerate(rows):
        ref = logits(merged_f64(model, name), x[row:row + 1])[0]
        own = run_on(model, name, lambda: logits(model, x[row:row + 1])[0])
        assert_close(mixed[row].float(), ref, own.float(), name=f"row {row} ({name})")


def test_disable_adapters_failing_unmerge_leaves_model_merged():
    """If one merged layer cannot be unmerged (its adapter changed since the merge), disable_adapters
    raises and merges back the layers it had already unmerged: nothing changed."""
    model = small_llama()
    lowrank.patch_linear(model, rank=4)
    randomize_B_(model)
    lowrank.merge(model)
    layers = list(lowrank.lora_layers(model))
    with torch.no_grad():
        layers[-1][1].lora_B["default"].mul_(1.0)  # same values, new version: unmerge must refuse
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="changed since it was merged"):
        with lowrank.disable_adapters(model):
            pass
    assert all(layer.merged and layer.active_adapter == "default" for _, layer in layers)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, weights[n]), n


@pytest.mark.parametrize("name", ["copy", "keys", "update", "training"])
def test_adapter_names_that_parameterdict_cannot_hold_are_refused(name):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    lowrank.patch_linear(model, rank=2)
    with pytest.raises(ValueError, match="nn.ParameterDict"):
        lowrank.add_adapter(model, name, rank=2)
    assert all(list(layer.configs) == ["default"] and list(layer.lora_A) == ["default"]
               for _, layer in lowrank.lora_layers(model))


@pytest.mark.gpu
def test_cuda_graph_replay_sees_adapter_weights_updated_in_place():
    """Eager calls reuse a packed copy of the adapters; a captured graph must not: weights changed in
    place after the capture (hot-swapped with load_adapter, or an optimizer step) reach the replay."""
    model = nn.Sequential(nn.Linear(64, 96)).cuda()
    lowrank.add_adapter(model, "a", rank=4)
    lowrank.add_adapter(model, "c", rank=64)
    randomize_B_(model, std=0.1)
    x = torch.randn(4, 64, device="cuda")
    gids = torch.tensor([0, 1, -1, 1], device="cuda")
    with torch.no_grad(), lowrank.adapter_ids(model, gids):
        model(x)  # warm-up: kernels compiled, tables and the packed copy cached
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        model[0].lora_B["c"].mul_(3.0)
        model[0].lora_A["a"].copy_(torch.randn_like(model[0].lora_A["a"]))
        graph.replay()
        torch.cuda.synchronize()
    for row, name in enumerate(["a", "c", None, "c"]):
        ref = merged_f64(model, name)(x[row].double())
        with torch.no_grad():
            own = run_on(model, name, lambda: model(x[row]))
        assert_close(out[row], ref, own, name=f"replay row {row} ({name})")


@pytest.mark.parametrize("backend", backends())
def test_mixed_batch_under_autocast(backend, monkeypatch):
    """Under bf16 autocast the base layer returns bf16 beside fp32 x and fp32 adapters: the mixed
    batch gives bf16 rows as close to float64 as each adapter's own autocast output is."""
    monkeypatch.setenv("LOWRANK_BACKEND", backend)
    model = nn.Sequential(nn.Linear(40, 30))
    lowrank.add_adapter(model, "a", rank=4, alpha=8)
    lowrank.add_adapter(model, "b", rank=16)
    randomize_B_(model, std=0.3)
    layer = model[0]
    x = torch.randn(3, 5, 40)
    rows = ["b", None, "a"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), lowrank.adapter_ids(model, rows):
        got = model(x)
    assert got.dtype == torch.bfloat16
    for row, name in enumerate(rows):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            if name is None:
                with lowrank.disable_adapters(model):
                    own = model(x[row])
            else:
                lowrank.set_adapter(model, name)
                own = model(x[row])
        base64 = x[row].double() @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()
        if name is None:
            ref = base64
        else:
            tid = torch.zeros(5, dtype=torch.long)
            ref = sgmv_f64(x[row], base64, tid, [layer.lora_A[name]], [layer.lora_B[name]], [layer.scaling(name)])
        assert_close(got[row], ref, own, name=f"row {row} ({name})")


def test_mixed_batch_ids_belong_to_the_thread_that_entered():
    """While one thread runs a mixed batch, a plain forward of the same model in another thread runs
    the active adapter (it used to take the mixed batch's ids); a second block is refused."""
    import threading

    base, model = three_adapters()
    lowrank.set_adapter(model, "a")
    x = ids(rows=2, seq=5)
    plain = logits(model, x)
    entered, release, seen, errors = threading.Event(), threading.Event(), {}, []

    def mixed():
        with lowrank.adapter_ids(model, ["b", None]):
            seen["mixed"] = logits(model, x)
            entered.set()
            release.wait(30)

    t = threading.Thread(target=mixed)
    t.start()
    assert entered.wait(30)
    try:
        seen["other"] = logits(model, x)
        try:
            with lowrank.adapter_ids(model, ["a", "a"]):
                pass
        except RuntimeError as exc:
            errors.append(str(exc))
    finally:
        release.set()
        t.join(30)
    assert torch.equal(seen["other"], plain), "another thread's forward used the mixed batch's ids"
    assert errors and "entered in thread" in errors[0], errors
    assert not torch.equal(seen["mixed"], plain)
    for row, name in enumerate(["b", None]):
        assert_close(seen["mixed"][row], logits(merged_f64(model, name), x[row:row + 1])[0],
                     run_on(model, name, lambda: logits(model, x[row:row + 1])[0]), name=f"row {row}")


@pytest.mark.parametrize("change", ["delete", "add", "load", "merge", "unpatch", "patch"])
def test_changes_that_reroute_rows_are_refused_inside_a_mixed_batch(change, tmp_path):
    """Deleting an adapter inside adapter_ids used to shift rows silently onto another adapter;
    every change to the adapters or weights is refused there, and the batch stays right."""
    base, model = three_adapters()
    lowrank.save_adapter(model, tmp_path, adapter_name="a")
    x = ids(rows=3, seq=4)
    rows = ["c", "b", None]
    with lowrank.adapter_ids(model, rows):
        before = logits(model, x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        action = {
            "delete": lambda: lowrank.delete_adapter(model, "a"),
            "add": lambda: lowrank.add_adapter(model, "d", rank=2),
            "load": lambda: lowrank.load_adapter(model, tmp_path, adapter_name="e"),
            "merge": lambda: lowrank.merge(model),
            "unpatch": lambda: lowrank.unpatch(model),
            "patch": lambda: lowrank.patch_linear(model, rank=2, adapter_name="f"),
        }[change]
        with pytest.raises(ValueError, match="inside an adapter_ids block"):
            action()
        assert lowrank.adapter_names(model) == ["a", "b", "c"]
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert torch.equal(logits(model, x), before)


def test_a_new_adapter_changes_nothing_that_runs(tmp_path):
    """Loading a second adapter into a model whose first adapter covers fewer layers used to make
    it active on the layers that had none, changing the output with no set_adapter call (peft's
    does not change); the new adapter was also left trainable (peft freezes it)."""
    model = small_llama()
    lowrank.patch_linear(model, rank=4, targets=["q_proj"], adapter_name="a")
    randomize_B_(model)
    donor = lowrank.patch_linear(small_llama(), rank=4, targets="all-linear", adapter_name="b")
    randomize_B_(donor)
    lowrank.save_adapter(donor, tmp_path, adapter_name="b")
    x = ids()
    before = logits(model, x)
    for call in (lambda: lowrank.load_adapter(model, tmp_path, adapter_name="b"),
                 lambda: lowrank.add_adapter(model, "c", rank=2)):
        call()
        assert torch.equal(logits(model, x), before)
        assert {layer.active_adapter for _, layer in lowrank.lora_layers(model)} == {"a", None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".a" in n for n in trainable), trainable
    lowrank.set_adapter(model, "b")
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"b"}
    assert not torch.equal(logits(model, x), before)
    lowrank.add_adapter(model, "d", rank=2, set_active=True)
    assert {layer.active_adapter for _, layer in lowrank.lora_layers(model)} == {"d"}
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"d"}


def _peft_names(pm):
    return {n.removeprefix("base_model.model.").replace(".weight", "") for n, p in pm.named_parameters()
            if p.requires_grad}


@settings(max_examples=12)
@given(steps=st.lists(st.tuples(st.sampled_from(["add", "load", "set", "delete"]), st.sampled_from(["b", "c", "d"]),
                                st.sampled_from(["all", "qv"])), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_adapter_state_follows_peft(steps, seed):
    """Random sequences of add / load / set / delete (of an inactive adapter) on lowrank and on peft
    from the same start: the same outputs and the same trainable parameters after every step.
    (Deleting the active adapter is model-wide here, per layer in peft: tested on its own below.)"""
    import tempfile

    import peft

    torch.manual_seed(seed)
    base = small_llama()
    ours = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=["q_proj"], adapter_name="a")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                 adapter_name="a", autocast_adapter_dtype=False)
    targets = {"all": ["q_proj", "k_proj", "v_proj", "o_proj"], "qv": ["q_proj", "v_proj"]}
    def sync(name):  # random factors for `name`, the same in both
        peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                       if hasattr(m, "lora_A")}
        for path, layer in lowrank.lora_layers(ours):
            if name in layer.configs:
                with torch.no_grad():
                    layer.lora_A[name].normal_(0, 0.3)
                    layer.lora_B[name].normal_(0, 0.3)
                    peft_layers[path].lora_A[name].weight.copy_(layer.lora_A[name])
                    peft_layers[path].lora_B[name].weight.copy_(layer.lora_B[name])

    sync("a")
    x = ids()
    with tempfile.TemporaryDirectory() as tmp:
        for op, name, tgt in steps:
            have = set(lowrank.adapter_names(ours))
            if op in ("add", "load") and name not in have:
                if op == "add":
                    lowrank.add_adapter(ours, name, rank=4, alpha=8, targets=targets[tgt])
                    theirs.add_adapter(name, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[tgt]))
                    sync(name)
                else:
                    donor = lowrank.patch_linear(copy.deepcopy(base), rank=4, alpha=8, targets=targets[tgt],
                                                 adapter_name=name)
                    randomize_B_(donor, std=0.3)
                    lowrank.save_adapter(donor, f"{tmp}/{name}", adapter_name=name)
                    lowrank.load_adapter(ours, f"{tmp}/{name}", adapter_name=name)
                    theirs.load_adapter(f"{tmp}/{name}", adapter_name=name)
            elif op == "set" and name in have:
                lowrank.set_adapter(ours, name)
                theirs.set_adapter(name)
            elif op == "delete" and name in have and name != lowrank.patch.active_adapter(ours):
                lowrank.delete_adapter(ours, name)
                theirs.delete_adapter(name)
            else:
                continue
            assert set(lowrank.adapter_names(ours)) == set(theirs.peft_config), (op, name)
            mine = {n for n, p in ours.named_parameters() if p.requires_grad}
            assert mine == _peft_names(theirs), (op, name, sorted(mine ^ _peft_names(theirs)))
            assert torch.allclose(logits(ours, x), logits(theirs, x), rtol=1e-4, atol=1e-5), (op, name)


def test_deleting_the_active_adapter_picks_one_for_the_whole_model():
    """peft picks the new active adapter layer by layer (a layer without the first remaining name
    activates its own first one); lowrank picks the first remaining name in sorted order for the
    whole model, trainable, and layers without it run their base layer."""
    model = small_llama()
    lowrank.patch_linear(model, rank=4, targets=["q_proj"], adapter_name="a")
    lowrank.add_adapter(model, "c", rank=4, targets=["k_proj"])
    lowrank.add_adapter(model, "b", rank=4, targets=["q_proj"])
    lowrank.delete_adapter(model, "a")
    actives = {p.rsplit(".", 1)[-1]: layer.active_adapter for p, layer in lowrank.lora_layers(model)}
    assert actives == {"q_proj": "b", "k_proj": None}
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"b"}


def test_adapters_are_not_changed_inside_disable_adapters():
    """disable_adapters' exit puts back each layer's adapter as it was at its entry: set_adapter
    inside left the old adapter active with the new one's requires_grad flags (nothing trainable
    ran), delete_adapter inside made the exit raise and left no adapter active (found by a new-user
    audit). Changing adapters inside is refused, the model as it was; after the block it works."""
    model = lowrank.patch_linear(tiny_llama(), rank=2, targets=["q_proj"])
    lowrank.add_adapter(model, "b", rank=2, targets=["q_proj"])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with lowrank.disable_adapters(model):
        for call in (lambda: lowrank.set_adapter(model, "b"), lambda: lowrank.delete_adapter(model, "b"),
                     lambda: lowrank.add_adapter(model, "c", rank=2, targets=["q_proj"]),
                     lambda: lowrank.merge(model, adapter_name="b")):
            with pytest.raises(ValueError, match="inside a disable_adapters block"):
                call()
        with lowrank.disable_adapters(model):  # nested blocks still work
            pass
        twin = copy.deepcopy(model)  # a copy made inside is not inside any block
    lowrank.set_adapter(twin, "b")
    with lowrank.adapter_ids(model, ["b"]):  # choosing the active adapter inside a mixed batch: as before
        lowrank.set_adapter(model, "default")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {l.active_adapter for _, l in lowrank.lora_layers(model)} == {"default"}
    assert sorted(lowrank.adapter_names(model)) == ["b", "default"]
    lowrank.set_adapter(model, "b")
    assert {l.active_adapter for _, l in lowrank.lora_layers(model)} == {"b"}


def test_an_adapter_name_in_use_elsewhere_in_the_model_is_refused():
    """add_adapter with a name the model has, on other targets, was accepted: the trained adapter grew
    fresh factors at another rank under its name (found by a new-user audit). Refused, model unchanged."""
    model = lowrank.patch_linear(tiny_llama(), rank=2, targets=["q_proj"])
    lowrank.add_adapter(model, "b", rank=2, targets=["q_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter 'b' already exists on 2 layer"):
        lowrank.add_adapter(model, "b", rank=4, targets=["k_proj"])
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
