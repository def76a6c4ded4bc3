"""minilora.plan.plan_memory: its breakdown adds up, scales the right way, matches autograd's saved tensors for one
layer and stays under PEFT's measured peaks."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig

import minilora as ml
from minilora.config import OPTIMIZERS
from minilora.lora import LoraSpec
from minilora.plan import GiB, PlanOptions, format_plan, plan_memory
from minilora.plan_choice import SHAPE_SLACK, choose_plan, shape_options
from minilora.tiny import tiny_config

LLAMA2_7B = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        intermediate_size=11008, vocab_size=32000)
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("kw", [{}, dict(offload=True), dict(gradient_checkpointing=False), dict(quant=None),
                                dict(lora_targets=ALL_SEVEN, lora_r=16), dict(lora_dropout=0.1), dict(double_quant=False)])
def test_breakdown_sums_to_total(kw):
    plan = plan_memory(LLAMA2_7B, 2, 2048, **kw)
    assert sum(plan["breakdown"].values()) == plan["total"]
    assert all(v >= 0 for v in plan["breakdown"].values())
    assert plan["phase"] in plan["phases"]


def test_doubling_batch_grows_activations():
    one, two = plan_memory(LLAMA2_7B, 2, 1024), plan_memory(LLAMA2_7B, 4, 1024)
    assert two["breakdown"]["activations"] == 2 * one["breakdown"]["activations"]
    assert two["total"] > one["total"]
    assert two["breakdown"]["weights"] == one["breakdown"]["weights"]


def test_rank_grows_adapters_and_their_optimizer_state():
    r16, r64 = plan_memory(LLAMA2_7B, 1, 512, lora_r=16), plan_memory(LLAMA2_7B, 1, 512, lora_r=64)
    assert r64["breakdown"]["lora"] == 4 * r16["breakdown"]["lora"]
    # AdamW: two states per parameter, and a 4-byte step count for each of the 32 x 2 x 2 tensors
    assert r64["breakdown"]["optimizer"] == 2 * r64["breakdown"]["lora"] + 4 * 128


def test_offload_moves_checkpoints_to_host():
    on_gpu, offloaded = plan_memory(LLAMA2_7B, 2, 2048), plan_memory(LLAMA2_7B, 2, 2048, offload=True)
    layer_input = 2 * 2048 * 4096 * 2  # one (B, T, H) bf16 tensor
    assert on_gpu["breakdown"]["activations"] == 32 * layer_input
    assert offloaded["breakdown"]["activations"] == layer_input  # the one layer being recomputed
    assert offloaded["cpu"] == 32 * layer_input and on_gpu["cpu"] == 0
    assert offloaded["total"] < on_gpu["total"]


def test_fast_offload_holds_two_inputs_and_moves_the_embedding_table():
    """A fast layer offloads as two units fetched one ahead: two (B, T, H) inputs on the GPU in the backward,
    one unit's saved set and transients at a time, and the embedding table in host memory."""
    on_gpu = plan_memory(LLAMA2_7B, 4, 1024, fast=True, loss_chunk=512)
    offloaded = plan_memory(LLAMA2_7B, 4, 1024, fast=True, offload=True, loss_chunk=512)  # the plan's chunk
    layer_input, table = 4 * 1024 * 4096 * 2, 32000 * 4096 * 2
    assert offloaded["phase"] == "backward"
    assert offloaded["breakdown"]["activations"] == 2 * layer_input
    assert offloaded["breakdown"]["embed_lm_head"] == on_gpu["breakdown"]["embed_lm_head"] - table
    assert offloaded["cpu"] == 2 * 32 * layer_input + table
    assert offloaded["breakdown"]["layer_backward"] < on_gpu["breakdown"]["layer_backward"]  # half a layer
    assert offloaded["breakdown"]["graph_inputs"] == layer_input  # the graphs' copy of the embedded rows
    # at the loss moment the last two units' tensors wait on the GPU, and from KEEP_ATTENTION tokens a row the
    # attention unit's kept output (S, q) and fp32 logsumexp with them (kernels/offload.py)
    for T, kept in ((1024, 0), (2048, 4 * 2048 * 4096 * 2 + 4 * 32 * 2048 * 4)):
        at_loss = plan_memory(LLAMA2_7B, 4, T, fast=True, offload=True, loss_chunk=4096)
        assert at_loss["phase"] == "loss" and at_loss["breakdown"]["activations"] == 2 * 4 * T * 4096 * 2 + kept
    # the table stays on the GPU when asked, and with transformers' layers
    kept = plan_memory(LLAMA2_7B, 4, 1024, fast=True, offload=True, loss_chunk=512, embedding_on_host=False)
    assert kept["total"] - offloaded["total"] == table - layer_input and "graph_inputs" not in kept["breakdown"]
    assert plan_memory(LLAMA2_7B, 4, 1024, offload=True)["breakdown"]["embed_lm_head"] == 2 * table


def test_an_offloaded_recompute_keeps_one_halfs_weights_at_a_time():
    """With keep_weights a checkpointed layer's recompute keeps its dequantized weights for its backward. On the
    GPU the whole layer's stay; offloaded, the layer is two units recomputed one after the other, each keeping its
    own weights and freeing them before the next, so the backward holds at most the MLP's (the larger half), on
    top of what it holds with every weight cached. On the H200 the 4.8 GiB plan's 4 x 576 and 4 x 640 steps then
    measure within 0.4% of their predictions, against 3.6-3.9% over with the whole layer counted
    (benchmarks/results/2026-12-01-h200-shape-peaks-kept-halves.txt, ...-capture-stream.txt)."""
    H, I = 4096, 11008
    layer, mlp = (4 * H * H + 3 * H * I) * 2, 3 * H * I * 2  # bf16 weights of one layer, of its MLP
    for offload in (False, True):
        for T in (256, 576, 1024):
            kept, cached = (plan_memory(LLAMA2_7B, 4, T, fast=True, checkpointed=32, offload=offload,
                                        loss_chunk=512, **kw)["phases"]["backward"]
                            for kw in ({"keep_weights": True}, {"cached_layers": 32}))
            if offload:
                assert 0 < kept - cached <= mlp
            else:
                assert kept - cached == layer


def test_long_rows_offload_attention_outputs_too():
    """From KEEP_ATTENTION tokens a row an offloaded attention unit also sends attention's (S, q) output and fp32
    logsumexp to the host; shorter rows do not. They come back during the MLP half's backward, which may then
    be the peak: by at most their size, and not at 32k tokens, where the attention half's is far larger."""
    from minilora.kernels.attention import KEEP_ATTENTION

    table = 32000 * 4096 * 2
    for T in (KEEP_ATTENTION // 2, KEEP_ATTENTION, 32768):
        plan = plan_memory(LLAMA2_7B, 1, T, fast=True, offload=True, loss_chunk=512)
        kept = T * 4096 * 2 + 32 * T * 4 if T >= KEEP_ATTENTION else 0
        assert plan["cpu"] == 2 * 32 * T * 4096 * 2 + 32 * kept + table
        with pytest.MonkeyPatch.context() as m:
            m.setattr("minilora.plan.KEEP_ATTENTION", 10**9)
            without = plan_memory(LLAMA2_7B, 1, T, fast=True, offload=True, loss_chunk=512)["total"]
        assert 0 <= plan["total"] - without <= kept
        assert plan["total"] == without or T < 32768


def test_choose_plan_offloads_only_when_nothing_else_fits():
    leanest = plan_memory(LLAMA2_7B, 4, 1024, fast=True, loss_chunk=512)["total"]
    roomy = choose_plan(LLAMA2_7B, 4, 1024, leanest + GiB)
    tight = choose_plan(LLAMA2_7B, 4, 1024, leanest - 0.5 * GiB)
    assert roomy["fits"] and not roomy["options"].offload
    assert tight["fits"] and tight["options"].offload and tight["plan"]["total"] <= leanest - 0.5 * GiB
    refused = choose_plan(LLAMA2_7B, 4, 1024, leanest - 0.5 * GiB, fixed={"offload": False, "stream": False})
    assert not refused["fits"] and not refused["options"].offload


LLAMA2_70B = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=32000)


def test_streamed_weights_leave_slots_on_the_device_and_every_layer_in_host_memory():
    """Llama-2-70B's shape, by hand: a layer's seven 4-bit linears hold H(2H + 2 kv) + 3 H I weights, two a byte,
    and double-quantized scales of one byte a 64-block plus an fp32 scale a 256 of those; each linear keeps its code
    tables (1 KiB) on the device. Streamed, SLOTS layers' codes and scales are on the device, every layer's in host
    memory, and a step copies each layer in twice but the last SLOTS (the forward leaves them for the backward)."""
    from minilora.kernels.stream import SLOTS

    H, I, kv, L = 8192, 28672, 1024, 80
    sizes = [H * H, H * kv, H * kv, H * H, H * I, H * I, I * H]
    codes = sum(n // 2 for n in sizes)
    scales = sum(n // 64 + 4 * -(-n // (64 * 256)) for n in sizes)
    options = PlanOptions(fast=True, offload=True, loss_chunk=512)
    resident = plan_memory(LLAMA2_70B, 4, 1024, options)
    streamed = plan_memory(LLAMA2_70B, 4, 1024, dataclasses.replace(options, stream=True))
    assert resident["breakdown"]["weights"] == L * codes and streamed["breakdown"]["weights"] == SLOTS * codes
    assert streamed["breakdown"]["quant_state"] == SLOTS * scales + L * 7 * 1024
    assert resident["breakdown"]["quant_state"] == L * (scales + 7 * 1024)
    assert streamed["streamed_host"] == L * (codes + scales) and resident["streamed_host"] == 0
    assert streamed["cpu"] - resident["cpu"] == L * (codes + scales)
    assert streamed["streamed_per_step"] == (2 * L - SLOTS) * (codes + scales)
    assert resident["total"] - streamed["total"] == (L - SLOTS) * (codes + scales)


def test_choose_plan_streams_only_when_nothing_resident_fits():
    """A 70B model at 4 x 1024 tokens: at 48 GiB the weights stay on the device; at 20 GiB nothing resident fits
    (every resident plan holds its 34 GiB of 4-bit weights), and the plan streams them, every layer checkpointed,
    none cached, with CUDA graphs; the checkpointed inputs stay on the device where they fit (20 GiB), and go to
    host memory too where they do not (8 GiB). A config that fixes the checkpointing leaves streaming closed."""
    resident = choose_plan(LLAMA2_70B, 4, 1024, 48 * GiB)
    assert resident["fits"] and not resident["options"].stream
    leanest_resident = plan_memory(LLAMA2_70B, 4, 1024, PlanOptions(fast=True, offload=True, loss_chunk=512))
    assert leanest_resident["total"] > 34 * GiB
    lean = choose_plan(LLAMA2_70B, 4, 1024, 20 * GiB)
    o = lean["options"]
    assert lean["fits"] and lean["plan"]["total"] <= 20 * GiB
    assert o.stream and not o.offload and o.graphs and o.checkpointed == 80 and o.cached_layers == 0
    leaner = choose_plan(LLAMA2_70B, 4, 1024, 8 * GiB)
    assert leaner["fits"] and leaner["options"].stream and leaner["options"].offload
    assert not choose_plan(LLAMA2_70B, 4, 1024, 20 * GiB, fixed={"gradient_checkpointing": True})["options"].stream
    shorter = shape_options(LLAMA2_70B, 4, 128, lean)  # shorter batches: still every layer checkpointed
    assert shorter.stream and shorter.checkpointed == 80


def test_choose_plan_gives_up_graphs_last_and_returns_the_leanest_when_nothing_fits():
    """At 1 x 32768 tokens, weights resident (stream fixed off), the offloaded plan fits 7.5 GiB only with eager
    steps: CUDA graphs keep their own copy of the embedded rows (256 MiB here). With less, nothing fits, and the
    leanest plan comes back, flagged; a config without CUDA graphs (fixed) never counts their copy."""
    rows = 32768 * 4096 * 2
    graphed = plan_memory(LLAMA2_7B, 1, 32768, PlanOptions(fast=True, offload=True, loss_chunk=512))
    eager = plan_memory(LLAMA2_7B, 1, 32768, PlanOptions(fast=True, offload=True, loss_chunk=512, graphs=False))
    assert graphed["breakdown"]["graph_inputs"] == rows and "graph_inputs" not in eager["breakdown"]
    assert eager["total"] <= 7.5 * GiB < graphed["total"]
    fits = choose_plan(LLAMA2_7B, 1, 32768, 7.5 * GiB, fixed={"stream": False})
    assert fits["fits"] and fits["options"].offload and not fits["options"].graphs
    leanest = choose_plan(LLAMA2_7B, 1, 32768, 6 * GiB, fixed={"stream": False})
    assert not leanest["fits"] and leanest["plan"]["total"] == eager["total"]
    assert leanest["plan"]["total"] < plan_memory(LLAMA2_7B, 1, 32768, PlanOptions(fast=True, loss_chunk=512))["total"]
    roomy = choose_plan(LLAMA2_7B, 4, 1024, 40 * GiB, fixed={"graphs": False})
    assert not roomy["options"].graphs and roomy["plan"]["inputs"]["graphs"] is False


def _shape_peak(choice, B, T, options):
    """plan_memory's peak for a B x T micro-batch under `options`, its graphs' input buffers sized for the longest."""
    b = plan_memory(LLAMA2_7B, B, T, options)["breakdown"]
    return sum(b.values()) - b.get("graph_inputs", 0) + choice["plan"]["breakdown"].get("graph_inputs", 0)


@pytest.mark.parametrize("budget", [4.8, 6, 12])
def test_shorter_micro_batches_checkpoint_fewer_layers_within_the_longest_ones_peak(budget):
    """The plan is chosen for 4 x 1024 tokens; a shorter micro-batch spends the room its smaller activations leave
    on the recompute keeping its weights, then on fewer checkpointed layers: as few as keep its predicted peak
    SHAPE_SLACK of the budget under the longest batch's, and no fewer. At the longest shape the options are the
    chosen ones, and what lasts the run stays as chosen."""
    choice = choose_plan(LLAMA2_7B, 4, 1024, budget * GiB)
    longest, ceiling = choice["options"], min(budget * GiB, choice["plan"]["total"]) - SHAPE_SLACK * budget * GiB
    assert shape_options(LLAMA2_7B, 4, 1024, choice).layers_checkpointed(32) == longest.layers_checkpointed(32)
    counts = []
    for T in range(64, 1025, 64):
        o = shape_options(LLAMA2_7B, 4, T, choice)
        n = o.layers_checkpointed(32)
        counts.append(n)
        assert (o.cached_layers, o.offload, o.loss_chunk, o.graphs) == (longest.cached_layers, longest.offload,
                                                                         longest.loss_chunk, longest.graphs)
        assert o.embedding_on_host == choice["plan"]["inputs"]["embedding_on_host"]  # even with none checkpointed
        # as chosen for the longest (a shape close to it), or within the ceiling
        assert (n, o.keep_weights) == (longest.layers_checkpointed(32), longest.keep_weights) or \
            _shape_peak(choice, 4, T, o) <= ceiling
        if n:  # one fewer would not fit, nor would keeping the weights where they are not kept
            assert _shape_peak(choice, 4, T, dataclasses.replace(o, checkpointed=n - 1)) > ceiling
            assert o.keep_weights or _shape_peak(choice, 4, T, dataclasses.replace(o, keep_weights=True)) > ceiling
    assert counts == sorted(counts) and counts[0] < counts[-1]  # fewer for shorter batches, more for longer


def test_shape_options_leave_fixed_checkpointing_and_transformers_layers_alone():
    choice = choose_plan(LLAMA2_7B, 4, 1024, 6 * GiB, fixed={"gradient_checkpointing": True})
    assert shape_options(LLAMA2_7B, 4, 64, choice, fixed={"gradient_checkpointing": True}).checkpointed is None
    slow = {"options": PlanOptions(fast=False), "plan": plan_memory(LLAMA2_7B, 4, 1024), "budget": 6 * GiB}
    assert shape_options(LLAMA2_7B, 4, 64, slow).layers_checkpointed(32) == 32


def test_unquantized_weights_cost_four_times_more():
    nf4, bf16 = plan_memory(LLAMA2_7B, 1, 512), plan_memory(LLAMA2_7B, 1, 512, quant=None)
    assert bf16["breakdown"]["weights"] == pytest.approx(4 * nf4["breakdown"]["weights"], rel=1e-6)
    assert bf16["breakdown"]["quant_state"] == 0
    # double quant: 8-bit absmax instead of fp32, about 4x smaller quant state
    single = plan_memory(LLAMA2_7B, 1, 512, double_quant=False)["breakdown"]["quant_state"]
    assert 3.5 < single / nf4["breakdown"]["quant_state"] < 4.0


@pytest.mark.parametrize("batch, seq, kw, peft_gib", [
    (4, 512, {}, 6.54), (2, 2048, {}, 8.31), (2, 2048, dict(lora_targets=ALL_SEVEN, lora_r=16), 8.38)])
def test_at_or_below_peft_measured_peak(batch, seq, kw, peft_gib):
    """The planned 7B peak is the figure written out by hand in by_hand (to the byte: integer byte counts, no
    rounding on either side), and it is at or below PEFT's peak measured on the H100 (shared/device/README.md):
    minilora keeps embeddings, norms and lm_head in bf16 and never holds full fp32 logits."""
    plan = plan_memory(LLAMA2_7B, batch, seq, **kw)
    assert plan["phase"] == "loss"  # the moment by_hand describes
    assert plan["total"] == by_hand(LLAMA2_7B, batch, seq, **kw)
    assert plan["total"] / GiB <= peft_gib


def by_hand(c, B, T, lora_r=64, lora_targets=("q_proj", "v_proj"), dt=2, checkpointed=True):
    """plan_memory's peak, written out term by term from its comments, for transformers' layers (fast=False),
    NF4 with double quant, fp32 LoRA weights and AdamW, no dropout, no offload, every layer checkpointed or
    none, when the peak is at the loss: every layer's activations held, the chunked cross-entropy running.
    dt: the compute dtype's bytes."""
    H, I, V, L, nh = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers, c.num_attention_heads
    hd = H // nh
    q, kv = nh * hd, c.num_key_value_heads * hd
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H), "gate_proj": (H, I),
              "up_proj": (H, I), "down_proj": (I, H)}  # (in, out)
    sizes = [i * o for i, o in shapes.values()]
    S, N = B * T, B * (T - 1)  # tokens, and supervised rows (every label but the first)
    weights = L * sum(math.ceil(n / 2) for n in sizes)  # two 4-bit weights a byte
    # per 64-weight block a 1-byte absmax; per 256 of those an fp32 absmax; per weight a 256-entry fp32 code
    quant_state = L * sum(n // 64 + 4 * math.ceil(n / 64 / 256) + 256 * 4 for n in sizes)
    embed_lm_head, norms = 2 * V * H * dt, (2 * L + 1) * H * dt
    P = L * sum(lora_r * sum(shapes[t]) for t in lora_targets)  # A (r, in) and B (out, r) per target
    lora, adamw = 4 * P, 2 * 4 * P + 4 * 2 * L * len(lora_targets)  # fp32 weights; exp_avg, exp_avg_sq, step
    cublas = 2 * 32 * 2**20
    if checkpointed:
        held = L * S * H * dt  # each layer's input
    else:
        assert set(lora_targets) == {"q_proj", "v_proj"}  # the saved set below is that of LoRA on q and v
        attention = (S * H * 4  # the RMSNorm's fp32 copy of its input
                     + S * (2 * q + 2 * kv) * dt  # SDPA's q, k, v and output
                     + B * nh * T * 4  # its fp32 logsumexp
                     + S * H * dt  # the LoRA input, shared by q and v
                     + 2 * S * lora_r * dt)  # x A^T of q and of v
        mlp = S * H * 4 + 3 * S * I * dt  # the RMSNorm's copy; gate's output, silu(gate), up's output
        lora_cast = sum(lora_r * sum(shapes[t]) for t in lora_targets) * dt if dt != 4 else 0  # A, B in dt
        held = L * (attention + mlp + lora_cast)
    # the final norm's fp32 copy and output, the supervised rows and their grad, one chunk's logits at 8 bytes
    loss = S * H * (4 + dt) + 2 * N * H * dt + min(N, 4096) * V * max(8, 4 + dt)
    return weights + quant_state + embed_lm_head + norms + lora + adamw + cublas + held + loss


# Small enough to read, with a vocabulary large enough that the loss is the peak: B=2, T=256.
SMALL = tiny_config(vocab_size=2048)


def test_checkpointing_saves_what_the_formula_says():
    """Without checkpointing every layer keeps its saved set instead of its input: both totals are by_hand's, to
    the byte (integer byte counts), so the saving is L * (saved set - input) exactly."""
    ckpt, full = (plan_memory(SMALL, 2, 256, lora_r=8, gradient_checkpointing=g) for g in (True, False))
    assert ckpt["phase"] == full["phase"] == "loss"
    assert ckpt["total"] == by_hand(SMALL, 2, 256, lora_r=8)
    assert full["total"] == by_hand(SMALL, 2, 256, lora_r=8, checkpointed=False)
    assert full["total"] > ckpt["total"]


def test_formats_and_accepts_a_dict():
    cfg = tiny_config().to_dict()
    plan = plan_memory(cfg, 2, 64, lora_r=8)
    assert "total (peak)" in format_plan(plan) and "weights" in format_plan(plan)
    assert plan["total"] == plan_memory(tiny_config(), 2, 64, lora_r=8)["total"]


def test_float32_compute_costs_what_the_formula_says():
    """fp32 compute doubles the compute-dtype terms and nothing else (the 4-bit weights, fp32 LoRA weights and
    AdamW states stay, and so do the loss chunk's logits, counted at 8 bytes either way): to the byte, the
    embeddings and lm_head, the norms, the L checkpointed inputs, the final norm's output, and the supervised
    rows and their grad."""
    B, T, c = 2, 256, SMALL
    bf16, fp32 = (plan_memory(c, B, T, lora_r=8, compute_dtype=d) for d in (torch.bfloat16, torch.float32))
    assert bf16["phase"] == fp32["phase"] == "loss"
    assert bf16["total"] == by_hand(c, B, T, lora_r=8, dt=2)
    assert fp32["total"] == by_hand(c, B, T, lora_r=8, dt=4)
    H, L, S, N = c.hidden_size, c.num_hidden_layers, B * T, B * (T - 1)
    assert fp32["total"] - bf16["total"] == 2 * (2 * c.vocab_size * H + (2 * L + 1) * H + L * S * H + S * H + 2 * N * H)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lm_head"):
        plan_memory(LLAMA2_7B, 1, 512, lora_targets=("lm_head",))
    with pytest.raises(ValueError, match=r"'lion'.*\['adamw', 'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw'\]"):
        plan_memory(LLAMA2_7B, 1, 512, optimizer="lion")


# At r=16 on all seven linears each layer's adapter tensors are of every kind that bitsandbytes tells apart: 9 of 4096
# entries (exactly min_8bit_size: 8-bit states), 2 of 2048 (k's and v's B, under it: fp32 states) and 3 of 102400
# (gate's and up's B, down's A: 1e5 entries or more, so paged).
MIXED = tiny_config(hidden_size=256, intermediate_size=6400)


def test_each_optimizers_state_is_what_the_formula_says():
    """Each optimizer's state for MIXED's adapters, written out from bitsandbytes' Optimizer2State.init_state and
    get_state_buffer (and torch's AdamW), to the byte: the optimizer term in torch's allocator, the paged states
    beside the total. Nothing else in the plan changes with the optimizer."""
    L, small, mid, big = 2, 2048, 4096, 102400

    def fp32(n):  # two fp32 states
        return 2 * 4 * n

    def absmax(n):  # an fp32 absmax per 256-entry block, for each of the two 8-bit states
        return 2 * 4 * (n // 256)

    def eight(n):  # two uint8 states and their absmax
        return 2 * n + absmax(n)

    qmaps = 2 * 256 * 4  # the signed and unsigned quantization maps, once
    want = {"adamw": (L * (9 * fp32(mid) + 2 * fp32(small) + 3 * fp32(big) + 14 * 4), 0),  # + a 4-byte step each
            "adamw_8bit": (L * (9 * eight(mid) + 2 * fp32(small) + 3 * eight(big)) + qmaps, 0),
            "paged_adamw_8bit": (L * (9 * eight(mid) + 2 * fp32(small) + 3 * absmax(big)) + qmaps, L * 3 * 2 * big),
            "paged_adamw": (L * (9 * fp32(mid) + 2 * fp32(small)), L * 3 * fp32(big))}
    plans = {o: plan_memory(MIXED, 2, 64, lora_r=16, lora_targets=ALL_SEVEN, optimizer=o) for o in want}
    assert {o: (p["breakdown"]["optimizer"], p["paged_optimizer"]) for o, p in plans.items()} == want
    assert len({p["total"] - p["breakdown"]["optimizer"] for p in plans.values()}) == 1
    assert plans["paged_adamw"]["inputs"]["optimizer"] == "paged_adamw"
    assert "paged optimizer states" in format_plan(plans["paged_adamw"]) and "paged" not in format_plan(plans["adamw"])
    # bf16 adapters: torch's states follow the tensors' dtype, bitsandbytes' 32-bit states stay fp32
    bf16 = {o: plan_memory(MIXED, 2, 64, lora_r=16, lora_targets=ALL_SEVEN, optimizer=o, lora_dtype=torch.bfloat16)
            for o in ("adamw", "paged_adamw")}
    assert bf16["adamw"]["breakdown"]["optimizer"] == L * (2 * 2 * (9 * mid + 2 * small + 3 * big) + 14 * 4)
    assert bf16["paged_adamw"]["breakdown"]["optimizer"] == want["paged_adamw"][0]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_optimizer_train_builds_holds_the_planned_state(optimizer):
    """Each optimizer TrainConfig takes, as step.make_optimizer builds it, stepped once on the CPU over fp32 tensors of
    MIXED's adapter shapes (A (r, in), B (out, r) per target per layer) with random grads: its state tensors, each
    storage once (the 8-bit maps are shared), hold exactly the plan's optimizer bytes plus its paged ones. On the CPU
    bitsandbytes keeps would-be paged states in ordinary memory (get_state_buffer), so the split between the two is
    the formula test's, above; on a GPU benchmarks/step.py measures it."""
    from minilora.plan_layers import linear_shapes
    from minilora.optimizer import make_optimizer

    torch.manual_seed(0)
    shapes = [s for i, o in linear_shapes(MIXED).values() for s in ((16, i), (o, 16))] * MIXED.num_hidden_layers
    params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in shapes)
    for p in params:
        p.grad = torch.randn_like(p)
    opt, _ = make_optimizer(params, ml.TrainConfig(optimizer=optimizer), total_steps=10)
    opt.step()
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
    plan = plan_memory(MIXED, 2, 64, lora_r=16, lora_targets=ALL_SEVEN, optimizer=optimizer)
    assert len(opt.state) == len(shapes)
    assert sum(held.values()) == plan["breakdown"]["optimizer"] + plan["paged_optimizer"]


def test_the_room_an_8bit_optimizer_leaves_is_spent():
    """At 2 x 2048 tokens on LLaMA-2-7B (r=64 on q and v) 8-bit AdamW keeps 191 MiB less state than torch's fp32
    AdamW: within the same 8 GiB budget the plan keeps one more layer's weights dequantized."""
    fp32, eight = (choose_plan(LLAMA2_7B, 2, 2048, 8 * GiB, optimizer=o) for o in ("adamw", "adamw_8bit"))
    saved = fp32["plan"]["breakdown"]["optimizer"] - eight["plan"]["breakdown"]["optimizer"]
    assert 190 * 2**20 < saved < 192 * 2**20
    assert fp32["fits"] and eight["fits"] and eight["options"].cached_layers == fp32["options"].cached_layers + 1


@pytest.fixture(scope="module")
def one_layer_dir(tok_dir, tmp_path_factory):
    """A one-layer LLaMA-shaped bf16 checkpoint without grouped-query attention, like LLaMA-2-7B."""
    import shutil

    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("one_layer")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=512, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                 intermediate_size=1376, vocab_size=512)).to(torch.bfloat16).save_pretrained(out)
    shutil.copy(f"{tok_dir}/tokenizer.model", out)
    return str(out)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_layer_saved_set_matches_autograd(one_layer_dir, targets, dora):
    """The planner's per-layer saved tensors (its no-checkpointing activations) against what autograd really
    saves for one NF4 decoder layer with LoRA under bf16 autocast, counted through saved-tensor hooks, each
    storage once, parameters and the layer's own inputs left out. Tolerance 1%: only tiny tensors are
    approximated. (Dropout is left out: on the CPU it keeps a bf16 mask, on the GPU a 1-byte bool one.)"""
    import minilora as ml

    model, _ = ml.load_model(one_layer_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    ml.add_lora(model, targets=targets, r=16, use_dora=dora)
    model.train()
    B, T = 2, 256
    x = torch.randn(B, T, 512, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = model.model.rotary_emb(x, torch.arange(T)[None])
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model.layers[0](x, position_embeddings=cos_sin)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x, *cos_sin]}
    measured = sum(n for ptr, n in saved.items() if ptr not in skip)
    planned = plan_memory(model.config, B, T, lora_r=16, lora_targets=targets, gradient_checkpointing=False,
                          use_dora=dora)
    assert measured == pytest.approx(planned["breakdown"]["activations"], rel=0.01)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_fast_layer_saved_set_matches_autograd(one_layer_dir, targets, dora):
    """The same count for the fast layer (minilora/kernels/layer.py) without checkpointing: what its autograd
    functions save, against plan_memory(fast=True)'s activations (dropout left out, as above). The planner
    counts the layer's input too (its RMSNorm keeps it, and nothing else does), which the count here skips
    with the caller's other tensors, so it is added back."""
    import minilora as ml
    from minilora.kernels.layer import layer_forward

    model, _ = ml.load_model(one_layer_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    ml.add_lora(model, targets=targets, r=16, use_dora=dora)
    ml.prepare_for_training(model, fast=True, gradient_checkpointing=False, cached_layers=1)
    model.train()
    B, T = 2, 256
    x = torch.randn(B, T, 512, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t[:, :, None] for t in model.model.rotary_emb(x, torch.arange(T)[None]))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer_forward(model.model.layers[0], x, cos, sin)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x, cos, sin]}
    measured = sum(n for ptr, n in saved.items() if ptr not in skip) + x.nbytes
    planned = plan_memory(model.config, B, T, lora_r=16, lora_targets=targets, gradient_checkpointing=False,
                          fast=True, use_dora=dora)
    assert measured == pytest.approx(planned["breakdown"]["activations"], rel=0.01)


def test_options_and_setup_dataclasses_equal_their_keywords():
    """plan_memory takes a PlanOptions and a Setup, or their fields by name; gradient_checkpointing (True, False
    or a count) is read once, as PlanOptions.checkpointed."""
    by_class = plan_memory(LLAMA2_7B, 2, 512, ml.PlanOptions(fast=True, checkpointed=5, offload=True),
                           ml.Setup(lora=LoraSpec(r=16, dropout=0.1)))
    by_name = plan_memory(LLAMA2_7B, 2, 512, fast=True, gradient_checkpointing=5, offload=True, lora_r=16,
                          lora_dropout=0.1)
    assert by_class == by_name and by_class["inputs"]["checkpointed"] == 5
    assert plan_memory(LLAMA2_7B, 2, 512, gradient_checkpointing=True) == plan_memory(LLAMA2_7B, 2, 512)
    assert plan_memory(LLAMA2_7B, 2, 512, gradient_checkpointing=True)["inputs"]["checkpointed"] == 32


def test_a_target_named_twice_is_one_adapter():
    """add_lora wraps a linear once however often its name is given; the plan counts it once too."""
    once = plan_memory(LLAMA2_7B, 2, 512, PlanOptions(fast=True), lora_targets=("q_proj", "v_proj"))
    twice = plan_memory(LLAMA2_7B, 2, 512, PlanOptions(fast=True), lora_targets=("q_proj", "v_proj", "q_proj"))
    assert twice["breakdown"] == once["breakdown"]


def test_graphed_and_data_parallel_steps_hold_their_grads_at_the_loss_moment():
    """Graphed steps (fast layers) accumulate into LoRA grads that live through the run: their loss moment
    counts them, as it does for data-parallel steps (one flat buffer, all-reduced once a step) through
    transformers' layers; eager steps of one process through those layers free them (a backward peak counts
    them once)."""
    options = dict(checkpointed=31, loss_chunk=512, embedding_on_host=True)
    graphed = plan_memory(LLAMA2_7B, 4, 1024, PlanOptions(fast=True, **options), lora_targets=("q_proj", "v_proj"))
    eager = plan_memory(LLAMA2_7B, 4, 1024, PlanOptions(fast=False, **options), lora_targets=("q_proj", "v_proj"))
    parallel = plan_memory(LLAMA2_7B, 4, 1024, PlanOptions(fast=False, **options), lora_targets=("q_proj", "v_proj"),
                           data_parallel=True)
    lora_bytes = 32 * 2 * 64 * (4096 + 4096) * 4  # r 64 on q and v, fp32: A (64, 4096) and B (4096, 64) each
    assert graphed["phase"] == "loss" and graphed["breakdown"]["lora_grads"] == lora_bytes
    assert eager["breakdown"]["lora_grads"] == (lora_bytes if eager["phase"] == "backward" else 0)
    assert parallel["breakdown"]["lora_grads"] == lora_bytes
    assert eager["total"] <= parallel["total"] <= eager["total"] + lora_bytes
    for plan in (graphed, eager, parallel):
        assert plan["total"] == sum(plan["breakdown"].values())


def test_the_plan_reads_each_family_with_lora_on_any_linear(base_dir, family_dir):
    """plan_run plans a GPU run only for a model whose sizes plan_memory reads (plan_choice.plannable): LLaMA's
    seven linears by name. LoRA wraps a linear in a LoRALinear whose `base` is the linear, so the model that
    train() plans for still has them; a GPT-2 has none of them and trains with every layer checkpointed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minilora.plan_choice import plannable

    for source in (base_dir, family_dir):
        model, _ = ml.load_model(source, quant="nf4", compute_dtype=torch.float32, device="cpu")
        assert plannable(model)
        ml.add_lora(model, r=4, alpha=8)
        assert plannable(model)
        ml.add_lora(model, targets=("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), r=4, alpha=8)
        assert plannable(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    assert not plannable(gpt2)
