"""rsLoRA and DoRA, as PEFT defines them (LoraConfig's use_rslora, use_dora), against PEFT on the CPU in fp32:
logits and the adapters' gradients, adapter files loaded both ways, merging, a 20-step train() against a
hand-written PEFT run (test_reference's formulas), and minilora's fast layers (plain, checkpointed, offloaded)
against its transformers path.

Tolerances: fp32 on both sides, summation order only: 1e-5 on logits of O(1) and relative on one step's
gradients; 1e-4 relative per step over 20 steps (Adam's 1/sqrt(v) amplifies round-off on the smallest
gradients); a merged weight differs from W + update by one fp32 rounding of the folded product.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import minilora as ml
from minilora.data import Collator
from minilora.loss import causal_lm_loss
from minilora.tiny import instruction_rows
from test_reference import MAIN, lora_model, peft_params, reference

ROWS = instruction_rows(16, seed=3)
VARIANTS = [dict(use_rslora=True), dict(use_dora=True), dict(use_dora=True, use_rslora=True)]
IDS = ["rslora", "dora", "dora+rslora"]
TARGETS = ("q_proj", "v_proj", "down_proj")


def ours(base_dir, dropout=0.0, **variant):
    """minilora's adapter on the tiny base, its tensors moved off their start (B = 0 would hide the update)."""
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, targets=TARGETS, r=8, alpha=16, dropout=dropout, **variant)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ml.lora_state_dict(model).items():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(p * (1 + 0.1 * noise) if "magnitude" in name else noise * (0.1 if "lora_A" in name else 0.05))
    return model, tok


def peft_twin(base_dir, model, dropout=0.0, **variant):
    """PEFT's model of the same adapter, its weights copied from minilora's, by name."""
    base, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(TARGETS),
                                           **variant))
    mine = ml.lora_state_dict(model)
    theirs = peft_params(peft)
    assert theirs.keys() == mine.keys()
    with torch.no_grad():
        for k, p in theirs.items():
            p.copy_(mine[k])
    return peft, theirs


def step(model, params, x):
    loss = model(x, labels=x).loss
    return loss.detach(), dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_logits_and_gradients_equal_peft(base_dir, variant):
    model, _ = ours(base_dir, **variant)
    peft, theirs = peft_twin(base_dir, model, **variant)
    x = torch.randint(3, 512, (2, 24))
    loss, grads = step(model.train(), ml.lora_state_dict(model), x)
    ref_loss, ref = step(peft.train(), theirs, x)
    assert (loss - ref_loss).abs() <= 1e-5
    for k in ref:
        assert (grads[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k
    if variant.get("use_dora"):
        assert any("magnitude" in k and ref[k].norm() > 0 for k in ref)  # the magnitudes learn too


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_adapters_load_both_ways_and_merge(base_dir, tmp_path, variant):
    model, _ = ours(base_dir, **variant)
    x = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        logits = model.eval()(x).logits
    ml.save_adapter(model, tmp_path / "ours")
    base, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    peft = PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    assert peft.peft_config["default"].use_dora == variant.get("use_dora", False)
    assert peft.peft_config["default"].use_rslora == variant.get("use_rslora", False)
    with torch.no_grad():
        assert (peft(x).logits - logits).abs().max() <= 1e-5
    peft.save_pretrained(tmp_path / "peft")
    again, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.load_adapter(again, str(tmp_path / "peft"))
    with torch.no_grad():
        assert torch.equal(again.eval()(x).logits, logits)
        ml.merge_lora(model)
        assert (model(x).logits - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_train_equals_a_hand_written_peft_run(base_dir, tmp_path, variant):
    hp = {**MAIN, "max_steps": 20}
    model, tok, init = lora_model(base_dir, **variant)
    history = ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(tmp_path), precision="fp32", log_every=1,
                                                        progress=False, lora_r=8, lora_alpha=16, lora_dropout=0.1,
                                                        **variant, **hp))
    log, weights = reference(base_dir, tok, init, hp, **variant)
    logged = [h for h in history if "loss" in h]
    assert [h["loss"] for h in logged] == pytest.approx([loss for loss, _, _ in log], rel=1e-4)
    assert [h["grad_norm"] for h in logged] == pytest.approx([norm for _, norm, _ in log], rel=1e-4)
    for k, ref in weights[-1].items():
        assert (ml.lora_state_dict(model)[k].detach() - ref).norm() <= 1e-4 * ref.norm(), k


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("prepare", [dict(gradient_checkpointing=False), dict(gradient_checkpointing=True),
                                     dict(gradient_checkpointing=True, offload=True)],
                         ids=["plain", "checkpointed", "offloaded"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fast_layers_equal_transformers_layers(base_dir, variant, prepare, dropout):
    results = []
    for options in (dict(fast=False, gradient_checkpointing=False), dict(fast=True, **prepare)):
        model, tok = ours(base_dir, dropout=dropout, **variant)
        ml.prepare_for_training(model, **options)
        examples, _ = ml.encode_rows(ROWS[:4], tok, 128)
        torch.manual_seed(1)  # the same dropout masks
        loss, n = causal_lm_loss(model.train(), Collator(tok.pad_token_id)(examples))
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad for k, p in ml.lora_state_dict(model).items()}))
    (ref_loss, ref), (loss, got) = results
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for k in ref:
        assert got[k] is not None and (got[k] - ref[k]).norm() <= 1e-5 * ref[k].norm(), k


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_fast_decoding_equals_transformers_generate(base_dir, variant):
    """Greedy answers through the fast decoder (its projections rescale DoRA's rows with a KV cache) and through
    transformers' generate on the LoRALinear layers: the same tokens."""
    model, tok = ours(base_dir, **variant)
    prompts = ["Which is bigger, 3 or 8?", "Repeat after me: moon ship bread"]
    ml.prepare_for_training(model, fast=True)
    fast = [ml.generate(model, tok, p, max_new_tokens=12) for p in prompts]
    ml.prepare_for_training(model, fast=False)
    assert fast == [ml.generate(model, tok, p, max_new_tokens=12) for p in prompts]
