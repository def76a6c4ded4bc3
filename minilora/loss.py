"""Cross-entropy over the supervised tokens only, chunked, so that full fp32 logits never exist.

At batch 2 x 2048 and a 32000-word vocabulary, fp32 logits take 0.5 GB and their gradient as much again.
Here only the positions with a label are projected onto the vocabulary, a chunk of rows at a time, and the
gradient with respect to the hidden states is computed in the same pass: what autograd keeps is one
(N, hidden) tensor, the size of the hidden states themselves.
"""

from __future__ import annotations

import torch

IGNORE = -100


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for hidden rows h (N, H), frozen or trainable W (V, H), targets y (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        need_grad_h, need_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad_w else None
        for i in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[i : i + chunk_size].to(weight.dtype), targets[i : i + chunk_size]
            logits = (h @ weight.T).float()  # (n, V): the only logits alive, one chunk at a time
            target_logit = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(top).exp_()  # in place: exp(logit - max), no second (n, V) buffer
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            total += (top.squeeze(1) + norm.log().squeeze(1) - target_logit).sum()  # logsumexp - target
            if need_grad_h or need_grad_w:
                # d CE / d logits = softmax - onehot
                d = probs.div_(norm)
                d[torch.arange(len(y), device=d.device), y] -= 1
                d = d.to(weight.dtype)
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
        return grad_h, grad_w, None, None


def supervised_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096):
    """Summed cross-entropy of next-token predictions and the number of supervised tokens.

    hidden (B, T, H) are the final hidden states, weight (V, H) the lm_head, labels (B, T) the unshifted
    labels (HF convention: position t predicts labels[t + 1]), -100 where unsupervised.
    Returns (loss_sum, n_tokens); divide by the token count of the whole optimizer step, not per batch.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]  # (N, H): only supervised positions reach the vocabulary projection
    y = targets[keep]  # (N,)
    if not ((y >= 0) & (y < weight.shape[0])).all():  # one host sync; a bad id would index out of range
        raise ValueError(f"labels must be -100 or token ids below the vocabulary size {weight.shape[0]}")
    return ChunkedCrossEntropy.apply(rows, weight, y, chunk_size), y.numel()


def causal_lm_loss(model, batch: dict, chunk_size: int = 4096):
    """Run the decoder on a collated batch and return (loss_sum, n_tokens) without materialising logits."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return supervised_ce(out.last_hidden_state, model.lm_head.weight, batch["labels"], chunk_size)

