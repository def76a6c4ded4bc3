"""Tiny offline stand-ins for LLaMA 2: a sentencepiece tokenizer trained on the spot and a small config.

The demo, the tests and the CPU benchmarks use these, since no weights or tokenizer can be downloaded there.
The tokenizer has LLaMA's settings: unk 0, bos 1, eos 2, byte fallback, a dummy "▁" prefix, no padding id,
and no automatic BOS/EOS in the raw model.
"""

from __future__ import annotations

import io
import os

from transformers import LlamaConfig


def train_tokenizer(texts, out_dir: str, vocab_size: int = 512) -> str:
    """Train a BPE sentencepiece model on `texts` and write `out_dir/tokenizer.model`; returns out_dir."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, hard_vocab_limit=False, minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return out_dir


def tiny_config(vocab_size: int = 512, **overrides) -> LlamaConfig:
    """A LLaMA-2-shaped config small enough for a CPU: grouped-query attention, widths divisible by 64
    so that 4-bit quantization blocks (64 values) tile every linear."""
    kw = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)
