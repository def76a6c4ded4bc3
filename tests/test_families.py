"""LLaMA's family beyond LLaMA 2, on tiny random checkpoints (conftest.FAMILIES): Llama 3 (rope_type llama3, lm_head
tied to the embedding), Mistral (a sliding window), Qwen2 (q, k and v biases, tied embeddings); and Qwen3, whose
normalized q and k the fast layers do not compute, on transformers' layers.

Per family: the fast layers equal transformers' (loss and LoRA gradients), train() equals a hand-written PEFT run
step by step (test_reference's formulas), adapters go both ways between minilora and PEFT, merging keeps the
model's outputs, greedy decoding through the fast layers equals transformers' generate, and the example trains it.

Tolerances: fp32 on both sides, summation order only: 1e-5 relative on one step's loss and gradients (as
test_train's checkpointing tests), 1e-4 relative per step over a 20-step run (Adam divides by sqrt(v), which
amplifies round-off on the smallest gradients), 1e-5 absolute on logits of O(1).
"""

import json

import pytest
import torch
from peft import PeftModel

import minilora as ml
from minilora.data import Collator
from minilora.kernels.layer import unsupported
from minilora.loss import causal_lm_loss
from minilora.tiny import instruction_rows
from test_examples import example
from test_reference import MAIN, lora_model, reference

ROWS = instruction_rows(16, seed=3)
ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(path, **lora):
    model, tok = ml.load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    if lora:
        ml.add_lora(model, **lora)
        gen = torch.Generator().manual_seed(5)  # B = 0 would hide the LoRA branch
        with torch.no_grad():
            for name, p in ml.lora_state_dict(model).items():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "lora_A" in name else 0.05))
    return model, tok


def step(path, **prepare):
    """(loss, {LoRA grads}) of one forward and backward over four rows, prepared as `prepare` says."""
    model, tok = load(path, targets=ALL_SEVEN, r=8, alpha=16, dropout=0.1)
    ml.prepare_for_training(model, **prepare)
    model.train()
    examples, _ = ml.encode_rows(ROWS[:4], tok, 128)
    torch.manual_seed(1)  # the same dropout masks
    loss, n = causal_lm_loss(model, Collator(tok.pad_token_id)(examples))
    (loss / n).backward()
    return loss.detach(), {k: p.grad for k, p in ml.lora_state_dict(model).items()}


@pytest.mark.parametrize("prepare", [dict(gradient_checkpointing=False), dict(gradient_checkpointing=True),
                                     dict(gradient_checkpointing=True, offload=True)],
                         ids=["plain", "checkpointed", "offloaded"])
def test_fast_layers_equal_transformers(family_dir, prepare):
    model, _ = load(family_dir)
    assert unsupported(model, 128) is None
    ref_loss, ref = step(family_dir, fast=False, gradient_checkpointing=False)
    loss, got = step(family_dir, fast=True, **prepare)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for k in ref:
        assert (got[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k


def test_train_equals_a_hand_written_peft_run(family_dir, tmp_path):
    """20 steps of train() on the fast layers (dropout, clipping, warmup, accumulation: test_reference's MAIN)
    against PEFT's LoRA trained from the formulas, on the same batches, per step within 1e-4."""
    hp = {**MAIN, "max_steps": 20}
    model, tok, init = lora_model(family_dir)
    history = ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path), precision="fp32", log_every=1,
                                                        progress=False, lora_r=8, lora_alpha=16, lora_dropout=0.1,
                                                        **hp))
    assert "fast layers" in history[0]["memory_plan"]
    log, weights = reference(family_dir, tok, init, hp)
    logged = [h for h in history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx([loss for loss, _, _ in log], rel=1e-4)
    assert [h["grad_norm"] for h in logged] == pytest.approx([norm for _, norm, _ in log], rel=1e-4)
    for k, ref in weights[-1].items():
        got = ml.lora_state_dict(model)[k].detach()
        assert (got - ref).norm() <= 1e-4 * ref.norm(), k


def test_adapters_go_both_ways_with_peft_and_merge(family_dir, tmp_path):
    """minilora's adapter loads into PEFT and PEFT's into minilora with identical logits; merged (one shared
    tensor for lm_head and the embedding where they are tied) the model keeps them, and saves and loads alone."""
    model, tok = load(family_dir, targets=("q_proj", "v_proj", "down_proj"), r=8, alpha=16)
    x = torch.randint(3, 512, (2, 20))
    with torch.no_grad():
        ours = model.eval()(x).logits
    ml.save_adapter(model, tmp_path / "ours")
    base, _ = load(family_dir)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert (peft(x).logits - ours).abs().max() <= 1e-5
    peft.save_pretrained(tmp_path / "peft")
    again, _ = load(family_dir)
    ml.load_adapter(again, str(tmp_path / "peft"))
    with torch.no_grad():
        assert torch.equal(again.eval()(x).logits, ours)
    tied = model.get_input_embeddings().weight is model.lm_head.weight
    assert tied == model.config.tie_word_embeddings
    ml.save_merged(model, tok, str(tmp_path / "merged"))
    assert (model.get_input_embeddings().weight is model.lm_head.weight) == tied
    merged, _ = ml.load_model(str(tmp_path / "merged"), quant=None, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert (merged.eval()(x).logits - ours).abs().max() <= 1e-4  # NF4 dequantized once, the update folded in


def test_fast_decoding_equals_transformers_generate(family_dir):
    model, tok = load(family_dir, targets=("q_proj", "v_proj"), r=8, alpha=16)
    prompts = ["Which is bigger, 3 or 8?", "Repeat after me: moon ship bread"]
    ml.prepare_for_training(model, fast=True)  # the fast layers attached, as train() leaves them during a run
    fast = [ml.generate(model, tok, p, max_new_tokens=12) for p in prompts]
    ml.prepare_for_training(model, fast=False)
    assert fast == [ml.generate(model, tok, p, max_new_tokens=12) for p in prompts]


def test_the_example_trains_each_family(family_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS[:8]))
    assert example().main(["--model", family_dir, "--dataset", str(rows), "--output-dir", str(tmp_path / "out"),
                           "--eval-size", "0", "--lora-r", "4", "--max-steps", "2", "--template", "llama2"]) == 0
    out = capsys.readouterr().out
    assert "fast layers" in out and (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_other_families_train_on_transformers_layers_and_say_why(qwen3_dir, family_dir, tmp_path):
    """Qwen3 normalizes q and k, which the fast layers do not: train() runs transformers' layers and its plan line
    says so; so does Mistral on rows longer than its window."""
    model, tok = load(qwen3_dir)
    history = ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path / "qwen3"), max_steps=2,
                                                        max_len=128, progress=False, lora_r=4, log_every=1))
    assert history[0]["memory_plan"].startswith("transformers' decoder layers (its attention normalizes q and k)")
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    model, _ = load(family_dir)
    window = model.config.model_type == "mistral"
    assert (unsupported(model, 512) is not None) == window  # 256 tokens of window


def test_a_qwen2_with_its_own_tokenizer_and_chat_template_trains_end_to_end(tmp_path, capsys):
    """Bring your own model: a tiny Qwen2 whose tokenizer is a byte-level BPE without BOS carrying Qwen2.5's
    Jinja template (its default system prompt included). The example trains it with --template auto on the fast
    layers; the run's shape records the template, and the samples are prompted and stopped by it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from minilora.tiny import tiny_config
    from test_templates import QWEN25_INSTRUCT, qwen_tokenizer

    model_dir = tmp_path / "qwen"
    tok = qwen_tokenizer(QWEN25_INSTRUCT)
    tok.save_pretrained(model_dir)
    AutoModelForCausalLM.from_config(tiny_config(len(tok), Qwen2Config, tie_word_embeddings=True, bos_token_id=None,
                                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                                     ).save_pretrained(model_dir)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                       "content": a}]}) + "\n"
                            for q, a in [("What is the capital of France?", "Paris."), ("Say hi.", "Hi!")] * 4))
    out = tmp_path / "out"
    assert example().main(["--model", str(model_dir), "--dataset", str(rows), "--output-dir", str(out),
                           "--eval-size", "0", "--lora-r", "4", "--max-steps", "2", "--template", "auto"]) == 0
    printed = capsys.readouterr().out
    assert "a qwen2 model (Qwen2ForCausalLM); it trains on minilora's fast layers" in printed
    record = json.loads((out / "checkpoint-2" / "run.json").read_text())
    assert record["shape"]["template"] == "auto" and record["config"]["template"] == "auto"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["template"].startswith("jinja:")  # Qwen2.5's template is no built-in: the generic path
    assert [h for h in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "sample" in h]
