"""Cross-entropy over the supervised tokens only, chunked, so that full fp32 logits never exist.

At batch 2 x 2048 and a 32000-word vocabulary, fp32 logits take 0.5 GB and their gradient as much again.
Here only the positions with a label are projected onto the vocabulary, a chunk of rows at a time, and the
gradient with respect to the hidden states is computed in the same pass: what autograd keeps is one
(N, hidden) tensor, the size of the hidden states themselves.

Which positions are supervised is decided on the host, from the CPU labels the collator made
(forward.to_device): selecting them on the GPU with a boolean mask would make the host wait for the GPU once per
micro-batch. The decoder's forward is forward.final_hidden's.
"""

from __future__ import annotations

import torch

from .forward import final_hidden, to_device
from .template import IGNORE


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(h_i @ W^T, y_i) for hidden rows h (N, H), frozen or trainable W (V, H), targets y (N,) and
    optional row weights w (N,) (1 when None)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, row_weights=None):
        need_grad_h, need_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad_w else None
        for i in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[i : i + chunk_size].to(weight.dtype), targets[i : i + chunk_size]
            w = None if row_weights is None else row_weights[i : i + chunk_size, None]  # (n, 1)
            logits = (h @ weight.T).float()  # (n, V): the only logits alive, one chunk at a time
            target_logit = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(top).exp_()  # in place: exp(logit - max), no second (n, V) buffer
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            ce = top + norm.log() - target_logit[:, None]  # (n, 1): logsumexp - target
            total += (ce if w is None else ce * w).sum()
            if need_grad_h or need_grad_w:
                # d CE / d logits = softmax - onehot
                d = probs.div_(norm).scatter_add_(1, y[:, None], probs.new_full((len(y), 1), -1.0))
                d = (d if w is None else d.mul_(w)).to(weight.dtype)
                if need_grad_h:
                    grad_h[i : i + chunk_size] = d @ weight
                if need_grad_w:
                    grad_w += (d.T @ h).float()
                del d
            del logits, probs  # free this chunk's (n, V) buffers before the next chunk allocates its own
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def supervised_count(labels: list[int]) -> int:
    """How many of an example's labels the loss reads: those after the first (position t predicts t + 1)."""
    return len(labels) - 1 - labels[1:].count(IGNORE)


def _ce(hidden, weight, rows, targets, chunk_size, row_weights=None):
    # (N, H): only the supervised positions reach the vocabulary projection; dense: every position but the last
    selected = (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows) if row_weights is None
                else hidden[:, :-1].reshape(-1, hidden.shape[-1]))
    return ChunkedCrossEntropy.apply(selected, weight, targets, chunk_size, row_weights)


def causal_lm_loss(model, batch: dict, chunk_size: int = 4096):
    """Run the decoder on a batch and return (loss_sum, n_tokens): the summed next-token cross-entropy over the
    supervised tokens, and how many there are. The training step of `train()`, and of a loop of your own:

        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_sum, n_tokens = causal_lm_loss(model, batch)
        (loss_sum / n_tokens).backward()

    batch: a collated batch of CPU tensors as Collator returns it ("input_ids", unshifted "labels" with -100
    where unsupervised; position t predicts labels[t + 1]), which is moved to lm_head's device here; or one
    already through `to_device`. Padding is masked by its labels: right padding needs no attention mask.
    Returns loss_sum, a 0-d float32 tensor on the model's device that autograd tracks, and n_tokens, a Python
    int (counted on the host: reading it never waits for the GPU). Under gradient accumulation, divide each
    micro-batch's loss_sum by the supervised tokens of the whole optimizer step, not by its own n_tokens: then
    batch 4 x accumulation 1 equals batch 1 x accumulation 4. Precision is the caller's: run it under autocast
    (bf16, or fp16 with a GradScaler), or without for fp32; dropout follows model.train() / model.eval().

    Logits are never materialised: it runs the decoder (`model.base_model`, not the model's own forward) and
    projects only the supervised positions onto lm_head's weight, a chunk of chunk_size rows at a time
    (ChunkedCrossEntropy). A model prepared with fast=True runs through minilora's own layers (kernels/layer.py),
    unless the batch keeps a 2-D (left-padding) mask. A packed row's examples attend each to itself alone
    (Collator(pack_tokens=...)). A model that fsdp.shard sharded runs through the method it registered with
    FSDP (`sharded_loss`: decoder_loss, with the root's weights gathered around it).
    """
    sharded = model.__dict__.get("sharded_loss")
    return sharded(batch, chunk_size) if sharded else decoder_loss(model, batch, chunk_size)


def decoder_loss(model, batch: dict, chunk_size: int = 4096):
    """causal_lm_loss of a model whose weights are all present (not sharded)."""
    if "targets" not in batch:
        batch = to_device(batch, model.lm_head.weight.device, model.lm_head.weight.shape[0])
    hidden = final_hidden(model, batch)
    loss = _ce(hidden, model.lm_head.weight, batch.get("rows"), batch["targets"], chunk_size, batch.get("row_weights"))
    return loss, batch["n_tokens"]
