"""The fused projection (kernels/lora4bit.Projection: a frozen linear plus its LoRA as one autograd function, as the
fast layers run it) against LoRALinear's plain formula, the dequantizations a step costs, and offload's copies.

Tolerances:
- fp32, one layer: both paths multiply the same fp32 values (the same dequantized NF4 weight); only the order of
  the additions differs (the fused path adds the LoRA term inside a GEMM), so outputs agree to float32
  round-off: <= 1e-5 max-abs on O(1) values, gradients <= 1e-4 relative (norm of the difference / norm);
  measured: 5e-7 and 4e-7.
- bf16: each path rounds its products and sums to bf16 (2^-8 ~ 0.4% relative) at different points, and under
  autocast the plain path keeps the 4-bit base in fp32 on the CPU: <= 1e-2 relative; measured 2e-3 to 4e-3.
(Whole models through the fast layers against transformers': test_train.py, test_families.py, test_variants.py.)
"""

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import minilora as ml
from minilora.kernels.lora4bit import Projection
from minilora.lora import LoRALinear, LoraSpec

bnb = pytest.importorskip("bitsandbytes")


def nf4(linear: nn.Linear) -> nn.Module:
    """A real NF4 Linear4bit holding `linear`'s weight and bias; `.to("cpu")` quantizes it."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=linear.weight.dtype, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to("cpu")


def make_layer(kind: str, dtype=torch.float32, bias=False, dropout=0.0) -> LoRALinear:
    linear = nn.Linear(128, 96, bias=bias, dtype=dtype)
    layer = LoRALinear(nf4(linear) if kind == "nf4" else linear, LoraSpec(r=6, alpha=10, dropout=dropout))  # s = 5/3
    nn.init.normal_(layer.lora_B.weight, 0, 0.2)  # B = 0 at init would hide the LoRA branch
    return layer


def run(layer: LoRALinear, x, dy, fused: bool, seed=0):
    """(y, grad x, grad A, grad B) of one forward and backward with upstream gradient dy: through the layer as a
    projection of one member (fused), or its own forward."""
    torch.manual_seed(seed)  # the same dropout mask for both paths
    y = Projection([layer])(x).to(x.dtype) if fused else layer(x)
    return (y, *torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), dy))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 128), (3, 7, 128)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_layer_fused_matches_plain_fp32(kind, bias, shape, dropout):
    layer = make_layer(kind, bias=bias, dropout=dropout)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(*shape[:-1], 96)
    (y, *grads), (y_ref, *grads_ref) = run(layer, x, dy, fused=True), run(layer, x, dy, fused=False)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert (y - y_ref).abs().max() <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) <= 1e-4
    if dropout:  # the mask really was applied: without it the output differs
        assert (y - layer.eval()(x)).abs().max() > 1e-2


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_layer_fused_matches_plain_bf16(kind, autocast):
    # autocast: fp32 base weights, bf16 compute; else a bf16 base and input (LoRA weights are fp32 either way)
    dtype = torch.float32 if autocast else torch.bfloat16
    layer = make_layer(kind, dtype)
    x = torch.randn(3, 7, 128, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 7, 96, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (y, *grads), (y_ref, *grads_ref) = run(layer, x, dy, fused=True), run(layer, x, dy, fused=False)
    assert y.dtype == y_ref.dtype
    # each gradient comes back in its tensor's dtype: x's, and the fp32 master weights' for A and B
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]
    assert rel(y, y_ref) <= 1e-2
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) <= 1e-2


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bnb repacks weights only on AVX512-BF16 CPUs")
def test_fused_restores_a_weight_packed_for_cpu_inference():
    layer = make_layer("nf4")
    layer.base.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer.eval()(torch.randn(2, 128))  # bnb repacks the weight for its inference kernel here
    assert layer.base.weight.quant_state.packing_format_for_cpu
    layer.train()
    x, dy = torch.randn(3, 7, 128, requires_grad=True), torch.randn(3, 7, 96)
    y, *grads = run(layer, x, dy, fused=True)
    assert not layer.base.weight.quant_state.packing_format_for_cpu  # back to the layout training reads
    y_ref, *grads_ref = run(layer, x, dy, fused=False)
    assert (y - y_ref).abs().max() <= 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) <= 1e-4


def dequantizations(fn):
    """fn's result and how many whole 4-bit weights bitsandbytes dequantized while it ran.

    Counted at bitsandbytes' `dequantize_4bit` op, which both `bnb.functional.dequantize_4bit` and, on the CPU,
    the `gemm_4bit` op of bnb's forward (dequantize, then matmul) go through; patching the Python function alone
    would miss the latter.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name == "bitsandbytes::dequantize_4bit" for e in prof.events())


@pytest.mark.parametrize("fused", [False, True])
def test_dequantizations_per_step(fused):
    plain = make_layer("nf4")
    layer = (lambda x: Projection([plain])(x)) if fused else plain
    x = torch.randn(3, 7, 128, requires_grad=True)

    def step(forward, x):
        y, n_forward = dequantizations(lambda: forward(x))
        _, n_backward = dequantizations(lambda: y.backward(torch.randn_like(y)))
        return n_forward, n_backward

    # One to compute the output, one for the input gradient; W is never kept between them.
    assert step(layer, x) == (1, 1)
    # Non-reentrant checkpointing runs the forward again in the backward, which needs W for the output the
    # rest of a decoder layer consumes: 3 per step, on both paths.
    assert step(lambda x: checkpoint(layer, x, use_reentrant=False), x) == (1, 2)
    # An input that needs no gradient (the first layer's projections): nothing to dequantize in the backward.
    assert step(layer, x.detach()) == (1, 0)


def test_swiglu_function_matches_autograd_and_writes_over_its_input():
    """SwiGLU (kernels/swiglu.py) keeps only the stacked gate/up output and writes its gradient over it; its CPU
    formulas against autograd through F.silu(gate) * up, in fp32 (1e-6: one rounding per op)."""
    from minilora.kernels.swiglu import SwiGLU

    gu = torch.randn(4, 9, 2 * 13, dtype=torch.float64).float()
    ref_in = gu.clone().requires_grad_(True)
    gate, up = ref_in.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    dm = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dm)
    x = gu.clone().requires_grad_(True)
    m = SwiGLU.apply(x)
    assert torch.allclose(m, ref, atol=1e-6)
    (grad,) = torch.autograd.grad(m, x, dm)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_offloaded_units_wait_two_units_on_the_device_and_come_back_whole():
    """kernels/offload.Offload: a unit's device tensors are released when the unit two after it saves (the one
    after it must not wait for a copy that its predecessor only just started), the last two stay for the
    backward, and every unit's tensors come back, in reverse order, equal to what was saved. (The CPU runs the
    same bookkeeping with plain copies; the GPU's streams run in tests/test_gpu.py's offloaded steps.)"""
    from minilora.kernels.offload import Offload

    copies = Offload(torch.device("cpu"))
    units = [(torch.randn(3, 4), torch.randn(2)) for _ in range(5)]
    for k, (x, extra) in enumerate(units):
        slot = copies.save(x)
        copies.add(slot, extra)
        assert slot == k
        assert [g is not None for g in copies.gpu] == [i >= k - 1 for i in range(k + 1)]
    for k in reversed(range(5)):
        x, extra = copies.load(k)
        assert torch.equal(x, units[k][0]) and torch.equal(extra, units[k][1])
        assert copies.host[k] is None  # the host copy is handed back to the arena once loaded


def test_train_lets_go_of_the_offloaded_steps_host_memory(base_dir, tmp_path, monkeypatch):
    """The host arena that offloaded steps fill (pinned on a GPU: up to tens of GiB at long rows) is let go when
    train() ends, and the next offloaded forward starts a new one. (train() off a GPU plans no offload, so the
    plan here is made to offload, as a GPU's lean budget would.)"""
    import importlib

    from minilora.kernels import offload
    from minilora.plan import PlanOptions
    from minilora.tiny import instruction_rows

    loop = importlib.import_module("minilora.loop")  # the module (minilora.train is the function)
    plan = loop.plan_run
    monkeypatch.setattr(loop, "plan_run", lambda model, cfg: (PlanOptions(fast=True, offload=True, loss_chunk=512),
                                                              plan(model, cfg)[1], None))
    seen, take = [], offload.HostArena.take

    def recorded_take(arena, like):  # the arenas that the offloaded steps take host memory from
        seen.append(arena)
        return take(arena, like)

    monkeypatch.setattr(offload.HostArena, "take", recorded_take)
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.train(model, tok, instruction_rows(8, seed=1), ml.TrainConfig(output_dir=str(tmp_path), max_steps=2,
                                                                     batch_size=2, max_len=96, progress=False))
    assert seen and not offload._arenas  # the steps offloaded into an arena, which is gone
    copies = offload.Offload(torch.device("cpu"))
    assert copies.arena not in seen and offload._arenas == {torch.device("cpu"): copies.arena}
