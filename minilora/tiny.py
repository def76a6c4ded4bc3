"""Tiny offline stand-ins for LLaMA 2: a sentencepiece tokenizer trained on the spot and a small config.

The demo, the tests and the CPU benchmarks use these, since no weights or tokenizer can be downloaded there.
The tokenizer has LLaMA's settings: unk 0, bos 1, eos 2, byte fallback, a dummy "▁" prefix, no padding id,
and no automatic BOS/EOS in the raw model.
"""

from __future__ import annotations

import io
import os
import random

from transformers import LlamaConfig

from .template import render_chat


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


def tiny_config(vocab_size: int = 512, kind=LlamaConfig, **overrides):
    """A LLaMA-2-shaped config small enough for a CPU: grouped-query attention, widths divisible by 64
    so that 4-bit quantization blocks (64 values) tile every linear. kind: another family's config class
    (MistralConfig, Qwen2Config, ...) with the same sizes."""
    kw = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kind(**kw)


_WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "star", "rain", "wind",
          "apple", "bread", "house", "road", "book", "lamp", "ship", "cloud"]
_OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
              ("old", "new"), ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty")]


def instruction_rows(n: int, seed: int = 0) -> list[str]:
    """`n` synthetic instruction rows in guanaco-llama2-1k's `text` format, some of them multi-turn.

    The tasks can be learned by a tiny model from the prompt alone: copy, count, compare, opposites.
    """
    rng = random.Random(seed)

    def task():
        kind = rng.randrange(4)
        if kind == 0:
            words = " ".join(rng.sample(_WORDS, 3))
            return f"Repeat after me: {words}", f"Sure! {words}."
        if kind == 1:
            a, b = rng.sample(range(10), 2)
            return f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."
        if kind == 2:
            w, o = rng.choice(_OPPOSITES)[:: rng.choice((1, -1))]
            return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
        word = rng.choice(_WORDS)
        return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."

    rows = []
    for _ in range(n):
        pairs = [task() for _ in range(1 + (rng.random() < 0.3))]
        rows.append(render_chat([{"role": role, "content": text} for q, a in pairs
                                 for role, text in (("user", q), ("assistant", a))]))
    return rows


def _plain_sentences(n: int, seed: int) -> list[str]:
    """Ordinary sentences over the demo's words, with no chat markup: what the tiny base is pretrained on."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(_WORDS, 2)
        x, y = rng.sample(range(10), 2)
        w, o = rng.choice(_OPPOSITES)
        out.append(rng.choice([
            f"The {a} saw the {b}. The {b} saw the {a} too.",
            f"{max(x, y)} is bigger than {min(x, y)}, and {min(x, y)} is smaller than {max(x, y)}.",
            f"The opposite of {w} is {o}. The opposite of {o} is {w}.",
            f"The word {a} has {len(a)} letters. The word {b} has {len(b)} letters.",
            f"{a} {b} {a} {b}. Say it again: {a} {b}.",
        ]))
    return out


def build_base(out_dir: str, steps: int = 500, seed: int = 0, progress: bool = True, **config) -> str:
    """Write a tiny pretrained LLaMA-2-architecture base with its tokenizer to `out_dir`; returns out_dir.

    A random model is a poor base to fine-tune, so this one is first trained in full fp32 for a few hundred
    steps on plain sentences over the same words as the instruction rows. It then knows the words and facts
    but not the [INST] chat format, which is what the LoRA fine-tune teaches.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from .model import load_tokenizer

    sentences = _plain_sentences(4000, seed)
    train_tokenizer(sentences + instruction_rows(500, seed), out_dir, vocab_size=1000)
    tok = load_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tok), hidden_size=192, intermediate_size=384, num_hidden_layers=3,
               num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512)
    model = LlamaForCausalLM(tiny_config(**{**cfg, **config}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # documents: BOS + sentence + EOS, packed into rows of 64 tokens
    stream = [i for s in sentences
              for i in [tok.bos_token_id, *tok.encode(s, add_special_tokens=False), tok.eos_token_id]]
    rows = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="pretrain base", unit="step", dynamic_ncols=True, disable=not progress)
    for step in bar:
        batch = rows[torch.randint(len(rows), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        for g in opt.param_groups:  # linear decay: a few hundred steps need no warmup at this size
            g["lr"] = 3e-3 * (1 - step / steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.save_pretrained(out_dir)
    return out_dir
