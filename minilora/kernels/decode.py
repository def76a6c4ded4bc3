"""Greedy decoding through the fast layers: the weights they hold (kept dequantized by the memory plan, or
dequantized per use), a KV cache of fixed size for each of a few prompts decoded together, and on CUDA every new
token as one replayed CUDA graph (where every projection can run inside one: layer.capturable).

transformers' generate runs each decoder layer's modules one by one for every new token, and bitsandbytes'
4-bit linears with them: a 7B model spends tens of milliseconds a token on the host. Here the prompt runs
through the fast layers once (prefill), then each token's step (every layer with its KV cache write, the final
norm, lm_head, argmax) reads and writes fixed tensors only: each row's embedded input, its position and next
token, and the cache, so that on CUDA it is captured once and replayed, one launch a token. The embedding comes
before it, from the table where it is: on the device, or in host memory where the memory plan put it
(offload.embed: the chosen tokens' rows gathered there and copied).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .graphs import capture, on_capture_stream
from .layer import capturable, fast_layer, mlp_block, rope_tables
from .offload import embed
from .rmsnorm import rms_norm
from .rope import Rope
from .stream import streamed

CHECK_EVERY = 16  # new tokens between two looks for a stop id (each look waits for the GPU)


class Decoder:
    """Greedy continuations of up to `rows` prompts at once, each up to `max_len` tokens in all (prompt and
    answer), for a model whose decoder layers have FastLayers attached. Every row has its own KV cache and
    position, and one step advances all of them: a token's step reads every weight once, whatever the rows.
    Built once for several calls: its cache and CUDA graph serve each of them."""

    def __init__(self, model, max_len: int, dtype: torch.dtype, graphs: bool = True, rows: int = 1):
        self.model, self.max_len, self.dtype = model, max_len, dtype
        c, device = model.config, model.lm_head.weight.device
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (rows, c.num_key_value_heads, max_len, head_dim)
        # zeros, not empty: a masked position's weight is exactly 0, and 0 * NaN garbage would still be NaN
        self.cache = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                      for _ in model.model.layers]
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # each row's step input token ...
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)  # ... its position ...
        self.x = torch.zeros(rows, 1, c.hidden_size, dtype=dtype, device=device)  # ... and its embedding
        self.out = torch.zeros(rows, max_len, dtype=torch.long, device=device)  # out[b, p]: row b's choice at p
        self.graph = None
        self.graphs = graphs and device.type == "cuda" and capturable(model, dtype)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], max_new_tokens: int, stops: list[int]) -> list[list[int]]:
        """For each prompt (token ids), the new tokens after it, up to and with the first of the stop ids (the
        template's end-of-turn markers, EOS), or max_new_tokens of them, as far as max_len allows."""
        if len(prompts) > len(self.token):
            raise ValueError(f"{len(prompts)} prompts for a Decoder of {len(self.token)} rows")
        n = min(max_new_tokens, self.max_len - max(map(len, prompts)))
        if n <= 0:
            return [[] for _ in prompts]
        with on_capture_stream() if self.graphs else contextlib.nullcontext():  # prefill, warm-up, capture, replays
            return self._decode(prompts, n, torch.tensor(stops, device=self.out.device))

    def _decode(self, prompts: list[list[int]], n: int, stops: torch.Tensor) -> list[list[int]]:
        self.pos.zero_()  # rows without a prompt stay in range and are never read
        for b, ids in enumerate(prompts):  # each prompt through its own row: its step writes its first choice
            self.pos[b] = len(ids) - 1
            positions = torch.arange(len(ids), device=self.pos.device)[None]
            self._forward(self._embed(torch.tensor([ids])), positions, slice(b, b + 1))
        done = 1
        while done < n:
            for _ in range(min(CHECK_EVERY, n - done)):
                self._next()
            done = min(n, done + CHECK_EVERY)
            if all(torch.isin(self.out[b, len(ids):len(ids) + done], stops).any() for b, ids in enumerate(prompts)):
                break
        answers = []
        for b, ids in enumerate(prompts):
            new = self.out[b, len(ids):len(ids) + n].tolist()
            end = next((k for k, i in enumerate(new) if i in stops), len(new) - 1)
            answers.append(new[:end + 1])
        return answers

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding of ids (B, T) on the device, in the compute dtype, gathered where the table is."""
        return embed(self.model, ids).to(self.dtype)

    def _next(self):
        """One new token's step for every row: as a CUDA graph, captured at the first call, or eagerly."""
        self.x.copy_(self._embed(self.token))
        if self.graph is not None:
            return self.graph.replay()
        if not self.graphs:
            return self._step()
        self._step()  # the first step runs eagerly, as capture wants
        self.graph = torch.cuda.CUDAGraph()
        with capture(self.graph):  # recorded, not run: the next call replays it
            self._step()

    def _step(self):
        self.pos += 1
        self._forward(self.x, self.pos, slice(None))

    def _forward(self, h: torch.Tensor, positions: torch.Tensor, rows: slice):
        """Embedded tokens h (B, T, H) at `positions` (B, T) through the model for the cache's `rows` (B of them),
        their keys and values into those rows' cache; the argmax after each row's last position goes to
        out[b, last + 1] and becomes its next step's input token."""
        inner = self.model.model
        rope = rope_tables(self.model, h, positions)
        # key j is visible to the query at position p when j <= p: the prompt's causal mask, and for one new
        # token every filled cache entry of its row
        visible = torch.arange(self.max_len, device=h.device) <= positions[:, :, None]  # (B, T, max_len)
        for layer, (keys, values) in zip(inner.layers, self.cache):
            if stream := streamed(layer):  # every token's step copies every layer's 4-bit weights in turn
                stream[0].use(stream[1], +1)
            h = mlp_block(layer, _attention_block(layer, h, rope, (keys[rows], values[rows]), positions, visible))
        logits = self.model.lm_head(rms_norm(h[:, -1:], inner.norm))  # (B, 1, vocab)
        token = self.token[rows]
        token.copy_(logits.argmax(-1))
        self.out[rows].scatter_(1, positions[:, -1:] + 1, token)


def _attention_block(layer, x, rope, kv, positions, visible):
    """x + attention(norm(x)) with the rows' KV cache: each row's new keys and values written at its `positions`,
    the queries attending to the visible entries."""
    spec, att = fast_layer(layer), layer.self_attn
    B, T, _ = x.shape
    hd, n_q, n_kv = att.head_dim, att.config.num_attention_heads, att.config.num_key_value_heads
    q, k, v = Rope.apply(spec.qkv(rms_norm(x, layer.input_layernorm)), *rope, n_q, n_kv)  # (B, heads, T, hd)
    keys, values = kv  # (B, n_kv, max_len, hd): these rows' cache
    where = positions[:, None, :, None].expand_as(k)  # each row's new entries at its own positions
    keys.scatter_(2, where, k)
    values.scatter_(2, where, v)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None], scale=att.scaling,
                                       enable_gqa=n_kv != n_q)  # (B, n_q, T, hd)
    return spec.o(o.transpose(1, 2).reshape(B, T, n_q * hd), residual=x)
