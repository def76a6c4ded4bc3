"""Greedy decoding through the fast layers: the weights they hold (kept dequantized by the memory plan, or
dequantized per use), a KV cache of fixed size, and on CUDA every new token as one replayed CUDA graph (where
every projection can run inside one: layer.capturable).

transformers' generate runs each decoder layer's modules one by one for every new token, and bitsandbytes'
4-bit linears with them: a 7B model spends tens of milliseconds a token on the host. Here the prompt runs
through the fast layers once (prefill), then each token's step (embedding, every layer with its KV cache
write, the final norm, lm_head, argmax) reads and writes fixed tensors only: the next token, its position
and the cache, so that on CUDA it is captured once and replayed, one launch a token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer import capturable, fast_layer, mlp_block
from .rmsnorm import rms_norm
from .rope import Rope

CHECK_EVERY = 16  # new tokens between two looks for EOS (each look waits for the GPU)


class Decoder:
    """Greedy continuations of token ids, up to `max_len` tokens in all (prompt and answer), for a model whose
    decoder layers have FastLayers attached. Built once for several prompts: its cache and CUDA graph serve
    each of them."""

    def __init__(self, model, max_len: int, dtype: torch.dtype, graphs: bool = True):
        self.model, self.max_len, self.dtype = model, max_len, dtype
        c, device = model.config, model.lm_head.weight.device
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (1, c.num_key_value_heads, max_len, head_dim)
        # zeros, not empty: a masked position's weight is exactly 0, and 0 * NaN garbage would still be NaN
        self.cache = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                      for _ in model.model.layers]
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # the step's input token ...
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # ... and its position
        self.out = torch.zeros(max_len, dtype=torch.long, device=device)  # out[p]: the token chosen at position p
        self.graph = None
        self.graphs = graphs and device.type == "cuda" and capturable(model, dtype)

    @torch.no_grad()
    def __call__(self, ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
        """The new tokens after `ids`, up to and with the first EOS, or max_new_tokens of them."""
        n = min(max_new_tokens, self.max_len - len(ids))
        if n <= 0:
            return []
        prompt = torch.tensor([ids], device=self.token.device)
        self.pos.fill_(len(ids) - 1)  # the prompt's step writes its choice after its last position
        self._forward(prompt, torch.arange(len(ids), device=prompt.device))
        done = 1
        while done < n:
            for _ in range(min(CHECK_EVERY, n - done)):
                self._next()
            done = min(n, done + CHECK_EVERY)
            if eos_id is not None and (self.out[len(ids):len(ids) + done] == eos_id).any():
                break
        new = self.out[len(ids):len(ids) + n].tolist()
        return new[:new.index(eos_id) + 1] if eos_id in new else new

    def _next(self):
        """One new token's step: as a CUDA graph, captured at the first call, or eagerly."""
        if self.graph is not None:
            return self.graph.replay()
        if not self.graphs:
            return self._step()
        side = torch.cuda.Stream()  # the first step runs eagerly on a side stream, as capture wants a warm-up
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the next call replays it
            self._step()

    def _step(self):
        self.pos += 1
        self._forward(self.token, self.pos)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor):
        """ids (1, T) at `positions` (T,) through the model, their keys and values into the cache; the argmax
        after the last one goes to out[positions[-1] + 1] and becomes the next step's input token."""
        inner = self.model.model
        h = inner.embed_tokens(ids).to(self.dtype)  # (1, T, H)
        rope = [t.to(self.dtype)[:, :, None] for t in inner.rotary_emb(h, positions[None])]  # cos, sin (1, T, 1, hd)
        # key j is visible to the query at position p when j <= p: the prompt's causal mask, and for one new
        # token every filled cache entry
        visible = torch.arange(self.max_len, device=ids.device) <= positions[:, None]  # (T, max_len)
        for layer, kv in zip(inner.layers, self.cache):
            h = mlp_block(layer, _attention_block(layer, h, rope, kv, positions, visible))
        logits = self.model.lm_head(rms_norm(h[:, -1:], inner.norm))  # (1, 1, vocab)
        self.token.copy_(logits.argmax(-1))
        self.out.index_copy_(0, positions[-1:] + 1, self.token[0])


def _attention_block(layer, x, rope, kv, positions, visible):
    """x + attention(norm(x)) with the layer's KV cache: the new keys and values written at `positions`, the
    queries attending to the visible entries."""
    spec, att = fast_layer(layer), layer.self_attn
    B, T, _ = x.shape
    hd, n_q, n_kv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads
    q, k, v = Rope.apply(spec.qkv(rms_norm(x, layer.input_layernorm)), *rope, n_q, n_kv)  # (1, heads, T, hd)
    keys, values = kv
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[None, None], scale=att.scaling,
                                       enable_gqa=n_kv != n_q)  # (1, n_q, T, hd)
    return spec.o(o.transpose(1, 2).reshape(B, T, n_q * hd), residual=x)
