"""Greedy generation under a chat template, and the samples that train() logs."""

from __future__ import annotations

import torch
from .config import PRECISIONS, autocast
from .fsdp import is_sharded
from .kernels.decode import Decoder
from .kernels.layer import FastLayer, attach_fast, detach_fast, is_fast, unsupported
from .kernels.offload import host_embedding
from .model import place_embedding
from .processes import rank_and_world
from .template import encode_prompt, get_template

# prompts decoded together: a token's step reads every weight once for all of them, and each row's KV cache takes
# 0.5 MiB a token on a 7B shape
DECODE_ROWS = 4


def generate(model, tokenizer, prompt, max_new_tokens: int = 64, precision: str | None = None,
             template="auto") -> str:
    """Greedy answer to one user message (or a list of turns) under a chat template (a name or a Template, as
    encode_chat takes; "auto": the tokenizer's own, else llama2). The answer ends at the template's first stop id.

    It runs in eval mode (no LoRA dropout) and leaves the model in the mode it found. precision=None follows
    the model's compute dtype (its embeddings'): bf16 or fp16 autocast for a half-precision model, else fp32.
    A LLaMA decodes through minilora's fast layers (kernels/decode.py): those train() holds, with the weights
    its memory plan keeps, or on a GPU ones attached for the call; otherwise transformers' generate runs.
    """
    return _answers(model, tokenizer, [prompt], max_new_tokens, precision, template)[0]


@torch.no_grad()
def _answers(model, tokenizer, prompts, max_new_tokens: int, precision: str | None, template="auto") -> list[str]:
    """generate() for each prompt, through one Decoder (one CUDA graph) where it can, DECODE_ROWS prompts at a
    time."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a whole number of at least 1")
    if not prompts:
        return []
    template = get_template(template, tokenizer)
    ids = [encode_prompt([{"role": "user", "content": p}] if isinstance(p, str) else p, tokenizer, template)
           for p in prompts]
    stops = template.stop_ids(tokenizer)  # the end-of-turn markers and EOS
    device = model.lm_head.weight.device
    dtype = model.get_input_embeddings().weight.dtype
    precision = precision or next((name for name, d in PRECISIONS.items() if d == dtype), "fp32")
    # a sharded model (fsdp.py) decodes through its own forward, which gathers each layer's weights
    longest = max(map(len, ids)) + max_new_tokens
    servable = not is_sharded(model) and unsupported(model, longest) is None
    fast = servable and is_fast(model)
    # on a GPU, fast layers attached for the call when train() holds none; on the CPU, bitsandbytes' own
    # inference kernel reads the 4-bit weights faster than a dequantization per token would
    attach = servable and not fast and device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        if attach:  # for this call: the base weights dequantized as they are used
            for layer in model.model.layers:
                attach_fast(layer, FastLayer(layer))
        with autocast(device, precision):
            if fast or attach:
                rows = min(len(ids), DECODE_ROWS)
                decoder = Decoder(model, longest, PRECISIONS[precision], rows=rows)
                outs = [out for k in range(0, len(ids), rows)
                        for out in decoder(ids[k:k + rows], max_new_tokens, stops)]
            else:
                outs = _hf_answers(model, tokenizer, ids, max_new_tokens, stops)
    finally:
        if attach:
            detach_fast(model)
        model.train(was_training)
    cut = [next((k for k, i in enumerate(out) if i in stops), len(out)) for out in outs]  # any stop id ends it
    return [tokenizer.decode(out[:n], skip_special_tokens=True).strip() for out, n in zip(outs, cut)]


def _hf_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stops: list[int]
                ) -> list[list[int]]:
    """transformers' greedy answers, one prompt at a time; an embedding table in host memory comes to the device
    meanwhile (transformers' forward wants it there) and goes back."""
    table = host_embedding(model)
    if table is not None:
        place_embedding(model)
    answers = []
    try:
        for ids in prompts:
            x = torch.tensor([ids], device=model.lm_head.weight.device)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops)
            answers.append(out[0, len(ids):].tolist())
    finally:
        if table is not None:
            place_embedding(model, "cpu")
    return answers


def samples(model, tokenizer, prompts, max_new_tokens: int, precision: str, template="auto"
            ) -> list[tuple[str, str]]:
    """[(prompt, greedy answer)]. Every RNG is restored afterwards, so sampling leaves the training trajectory
    exactly as it would have been without it."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return list(zip(prompts, _answers(model, tokenizer, prompts, max_new_tokens, precision, template)))
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def shared_samples(model, tokenizer, prompts, max_new_tokens: int, precision: str, template="auto"
                   ) -> list[tuple[str, str]]:
    """samples(), shared by the processes of a process group (every one must call it): prompt k is process k %
    world's, and every process returns all the answers. A sharded model's every forward needs every process, so
    each of them answers all the prompts."""
    rank, world = rank_and_world()
    if world == 1 or is_sharded(model):
        return samples(model, tokenizer, prompts, max_new_tokens, precision, template)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, samples(model, tokenizer, prompts[rank::world], max_new_tokens,
                                                       precision, template))
    return [parts[k % world][k // world] for k in range(len(prompts))]
