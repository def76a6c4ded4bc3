"""Greedy generation through the fast layers and a KV cache (kernels/decode.py) against transformers' generate,
token for token, on tiny NF4 LLaMAs in fp32 on the CPU (the same arithmetic up to summation order, so the
argmax agrees; the GPU's CUDA-graph replay is checked in test_gpu.py)."""

import importlib

import pytest
import torch

import minilora as ml
from minilora.kernels.decode import Decoder
from minilora.kernels.layer import is_fast
from minilora.plan import PlanOptions
from minilora.generate import samples
from minilora.template import encode_prompt

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me more."}]]


def adapted(model_dir):
    """A tiny NF4 model with a LoRA update that matters (random A and B): dropout 0.5 would change answers."""
    model, tok = ml.load_model(model_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.5)
    return model.train(), tok


def transformers_answer(model, tok, prompt, n, eos_id=None):
    ids = encode_prompt([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt, tok)
    model.eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=eos_id or tok.eos_token_id)
    model.train()
    return ids, out[0, len(ids):].tolist()


@pytest.mark.parametrize("model_dir", ["base_dir", "mha_dir"])  # grouped-query and multi-head attention
def test_fast_decoding_equals_transformers_generate(model_dir, request):
    """ml.generate on the CPU runs transformers' generate and leaves the model as it was; a model prepared for
    training (weights kept dequantized, or the lean plan's projections dequantizing one member at a time; layers
    checkpointed) decodes through its own fast layers, and samples() shares one Decoder (cache) across prompts. Each
    answer is transformers' greedy answer, to the token. (On a GPU, fast layers attached for the call: test_gpu.py.)"""
    model, tok = adapted(request.getfixturevalue(model_dir))
    expected = [tok.decode(transformers_answer(model, tok, p, 24)[1], skip_special_tokens=True).strip()
                for p in PROMPTS]
    assert len(set(expected)) == len(PROMPTS) and all(expected)  # answers that differ: a real comparison
    assert [ml.generate(model, tok, p, max_new_tokens=24) for p in PROMPTS] == expected
    assert not is_fast(model) and model.training
    for options in (PlanOptions(fast=True, cached_layers=1, keep_weights=True),  # weights kept, or dequantized
                    PlanOptions(fast=True, offload=True)):  # per member (the lean plan's split projections)
        ml.prepare_for_training(model, options)
        assert is_fast(model)
        assert [ml.generate(model, tok, p, max_new_tokens=24) for p in PROMPTS] == expected
        assert [a for _, a in samples(model, tok, PROMPTS, 24, "fp32")] == expected


def test_decoding_stops_at_eos_and_at_max_len(base_dir):
    """With EOS = the 6th token transformers generates, both stop there and keep it; a Decoder whose max_len
    leaves room for 3 new tokens gives the first 3; a prompt that fills max_len gives none."""
    model, tok = adapted(base_dir)
    ids, full = transformers_answer(model, tok, PROMPTS[0], 24)
    eos = full[5]
    _, stopped = transformers_answer(model, tok, PROMPTS[0], 24, eos_id=eos)
    assert stopped == full[:full.index(eos) + 1] and len(stopped) < 24
    model.eval()
    ml.prepare_for_training(model, PlanOptions(fast=True))
    decoder = Decoder(model, len(ids) + 24, torch.float32)
    assert decoder([ids], 24, [eos]) == [stopped]
    never = next(i for i in range(len(tok)) if i not in full)  # a stop id that never comes: the others still stop
    assert decoder([ids], 24, [never, eos]) == [stopped]
    assert decoder([ids], 24, []) == [full]  # the same cache again: nothing left from the last prompt matters
    assert Decoder(model, len(ids) + 3, torch.float32)([ids], 24, []) == [full[:3]]
    assert Decoder(model, len(ids), torch.float32)([ids], 24, []) == [[]]


def test_prompts_decoded_together_equal_each_alone(base_dir, monkeypatch):
    """Rows of one Decoder step together, each with its own length, cache, positions and EOS: every row's answer
    is its prompt's answer alone, a row left without a prompt changes nothing, and generation in groups of
    DECODE_ROWS (here 2 for 3 prompts) gives transformers' answers."""
    model, tok = adapted(base_dir)
    alone = [transformers_answer(model, tok, p, 24) for p in PROMPTS]
    ids = [i for i, _ in alone]
    assert len(set(map(len, ids))) == len(ids)  # prompts of different lengths
    eos = alone[1][1][4]  # the 5th token of the second answer: that row stops early, the others do not
    model.eval()
    ml.prepare_for_training(model, PlanOptions(fast=True))
    decoder = Decoder(model, max(map(len, ids)) + 24, torch.float32, rows=4)
    together = decoder(ids, 24, [eos])
    for (prompt, full), answer in zip(alone, together):
        assert answer == (full[:full.index(eos) + 1] if eos in full else full)
    assert len(together[1]) < 24 and len(together[0]) == 24
    monkeypatch.setattr(importlib.import_module("minilora.generate"), "DECODE_ROWS", 2)  # the module, not the function
    expected = [tok.decode(full, skip_special_tokens=True).strip() for _, full in alone]
    assert [a for _, a in samples(model, tok, PROMPTS, 24, "fp32")] == expected


def test_other_models_generate_through_transformers(tokenizer):
    """A causal LM that is not a LLaMA (here a tiny GPT-2) gets transformers' greedy answer, as before."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2))
    ids, expected = transformers_answer(model, tokenizer, PROMPTS[0], 12)
    assert ml.generate(model, tokenizer, PROMPTS[0], max_new_tokens=12) == \
        tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_a_bad_answer_length_is_refused(base_dir):
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"max_new_tokens={bad!r}: give a whole number of at least 1"):
            ml.generate(model, tok, "Hi", max_new_tokens=bad)
