"""minilora.plan.plan_memory: its breakdown adds up, scales the right way, matches autograd's saved tensors for one
layer and stays under PEFT's measured peaks."""

import pytest
import torch
from transformers import LlamaConfig

from minilora.plan import GiB, choose_plan, format_plan, plan_memory
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
    assert r64["breakdown"]["optimizer"] == 2 * r64["breakdown"]["lora"]  # AdamW: two states per parameter


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
    on_gpu = plan_memory(LLAMA2_7B, 4, 1024, fast=True, loss_chunk=1024)
    offloaded = plan_memory(LLAMA2_7B, 4, 1024, fast=True, offload=True, loss_chunk=1024)  # the plan's chunk
    layer_input, table = 4 * 1024 * 4096 * 2, 32000 * 4096 * 2
    assert offloaded["phase"] == "backward"
    assert offloaded["breakdown"]["activations"] == 2 * layer_input
    assert offloaded["breakdown"]["embed_lm_head"] == on_gpu["breakdown"]["embed_lm_head"] - table
    assert offloaded["cpu"] == 2 * 32 * layer_input + table
    assert offloaded["breakdown"]["layer_backward"] < on_gpu["breakdown"]["layer_backward"]  # half a layer
    # the table stays on the GPU when asked (data-parallel runs), and with transformers' layers
    kept = plan_memory(LLAMA2_7B, 4, 1024, fast=True, offload=True, loss_chunk=1024, embedding_on_host=False)
    assert kept["total"] - offloaded["total"] == table
    assert plan_memory(LLAMA2_7B, 4, 1024, offload=True)["breakdown"]["embed_lm_head"] == 2 * table


def test_long_rows_offload_attention_outputs_too():
    """From KEEP_ATTENTION tokens a row an offloaded attention unit also sends attention's (S, q) output and fp32
    logsumexp to the host; shorter rows do not. They come back during the MLP half's backward, which may then
    be the peak: by at most their size, and not at 32k tokens, where the attention half's is far larger."""
    from minilora.kernels.layer import KEEP_ATTENTION

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
    assert roomy["fits"] and not roomy["options"]["offload"]
    assert tight["fits"] and tight["options"]["offload"] and tight["plan"]["total"] <= leanest - 0.5 * GiB
    refused = choose_plan(LLAMA2_7B, 4, 1024, leanest - 0.5 * GiB, fixed={"offload": False})
    assert not refused["fits"] and not refused["options"]["offload"]


def test_unquantized_weights_cost_four_times_more():
    nf4, bf16 = plan_memory(LLAMA2_7B, 1, 512), plan_memory(LLAMA2_7B, 1, 512, quant=None)
    assert bf16["breakdown"]["weights"] == pytest.approx(4 * nf4["breakdown"]["weights"], rel=1e-6)
    assert bf16["breakdown"]["quant_state"] == 0
    # double quant: 8-bit absmax instead of fp32, about 4x smaller quant state
    single = plan_memory(LLAMA2_7B, 1, 512, double_quant=False)["breakdown"]["quant_state"]
    assert 3.5 < single / nf4["breakdown"]["quant_state"] < 4.0


def test_checkpointing_saves_memory():
    assert plan_memory(LLAMA2_7B, 2, 2048, gradient_checkpointing=False)["total"] > plan_memory(LLAMA2_7B, 2, 2048)["total"]


@pytest.mark.parametrize("batch, seq, kw, peft_gib", [
    (4, 512, {}, 6.54), (2, 2048, {}, 8.31), (2, 2048, dict(lora_targets=ALL_SEVEN, lora_r=16), 8.38)])
def test_at_or_below_peft_measured_peak(batch, seq, kw, peft_gib):
    """PEFT's peaks measured on the H100 (shared/device/README.md). minilora keeps embeddings, norms and lm_head
    in bf16 and never holds full fp32 logits, so it should need less; the 4-bit weights alone are ~3.1 GiB."""
    total = plan_memory(LLAMA2_7B, batch, seq, **kw)["total"] / GiB
    assert 3.5 < total <= peft_gib


def test_prints_and_accepts_a_dict(capsys):
    cfg = tiny_config().to_dict()
    plan = plan_memory(cfg, 2, 64, lora_r=8, print_breakdown=True)
    out = capsys.readouterr().out
    assert "total (peak)" in out and "weights" in out and out.strip() == format_plan(plan)
    assert plan["total"] == plan_memory(tiny_config(), 2, 64, lora_r=8)["total"]


def test_float32_compute_costs_more():
    assert plan_memory(LLAMA2_7B, 1, 512, compute_dtype=torch.float32)["total"] > plan_memory(LLAMA2_7B, 1, 512)["total"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="lm_head"):
        plan_memory(LLAMA2_7B, 1, 512, lora_targets=("lm_head",))
    with pytest.raises(ValueError, match="lion"):
        plan_memory(LLAMA2_7B, 1, 512, optimizer="lion")


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


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_layer_saved_set_matches_autograd(one_layer_dir, targets):
    """The planner's per-layer saved tensors (its no-checkpointing activations) against what autograd really
    saves for one NF4 decoder layer with LoRA under bf16 autocast, counted through saved-tensor hooks, each
    storage once, parameters and the layer's own inputs left out. Tolerance 1%: only tiny tensors are
    approximated. (Dropout is left out: on the CPU it keeps a bf16 mask, on the GPU a 1-byte bool one.)"""
    import minilora as ml

    model, _ = ml.load_model(one_layer_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    ml.add_lora(model, targets=targets, r=16)
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
    planned = plan_memory(model.config, B, T, lora_r=16, lora_targets=targets, gradient_checkpointing=False)
    assert measured == pytest.approx(planned["breakdown"]["activations"], rel=0.01)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL_SEVEN])
def test_fast_layer_saved_set_matches_autograd(one_layer_dir, targets):
    """The same count for the fast layer (minilora/kernels/layer.py) without checkpointing: what its autograd
    functions save, against plan_memory(fast=True)'s activations (dropout left out, as above). The planner
    counts the layer's input too (its RMSNorm keeps it, and nothing else does), which the count here skips
    with the caller's other tensors, so it is added back."""
    import minilora as ml
    from minilora.kernels.layer import layer_forward

    model, _ = ml.load_model(one_layer_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    ml.add_lora(model, targets=targets, r=16)
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
                          fast=True)
    assert measured == pytest.approx(planned["breakdown"]["activations"], rel=0.01)
