"""A collated batch made ready on the device (to_device), and the decoder run on it (final_hidden): minilora's
fast layers where the model has them, else transformers' own decoder."""

from __future__ import annotations

import torch

from .kernels.attention import Segments, segment_mask
from .kernels.layer import is_fast, model_forward
from .template import IGNORE


def supervised_positions(labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets): the flat indices into (B * T) of the positions whose next token is supervised, and
    those tokens. labels (B, T) are unshifted (HF convention: position t predicts labels[t + 1])."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    b, t = keep.nonzero(as_tuple=True)
    y = targets[keep]  # (N,)
    if not ((y >= 0) & (y < vocab_size)).all():  # a bad id would index out of range on the GPU
        raise ValueError(f"labels must be -100 or token ids below the vocabulary size {vocab_size}")
    return b * labels.shape[1] + t, y


def to_device(batch: dict, device, vocab_size: int, dense: bool = False, embedding: torch.Tensor | None = None) -> dict:
    """A collated CPU batch, ready for causal_lm_loss on `device`, without making the host wait for the GPU:
    the supervised positions are found on the host, and the copies are asynchronous from pinned memory.

    The loss then reads "rows" (indices of the supervised positions) and "targets", and "n_tokens" (an int)
    counts them; with dense=True it reads every position instead, with "targets" (0 where unsupervised) and
    0/1 "row_weights": shapes that depend on the batch's shape alone, as a CUDA graph needs.
    A 2-D attention_mask that is right padding is dropped: a causal model never attends to later positions,
    so right padding changes no supervised output, and without a mask attention runs as plain causal
    (flash attention, no (T, T) mask). Any other mask (left padding) is kept; a packed row's segment_starts too.
    embedding: a host-resident embedding table (kernels.layer.host_embedding): the batch's rows of it are
    gathered here, into pinned memory, and copied as "inputs_embeds".
    """
    rows, targets = supervised_positions(batch["labels"], vocab_size)
    out = {k: v for k, v in batch.items() if k != "labels"}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        del out["attention_mask"]
    if dense:  # the same positions, as 0/1 weights over all B * (T - 1) of them
        following = batch["labels"][:, 1:]  # (B, T - 1): what each position predicts
        out.update(row_weights=(following != IGNORE).float().reshape(-1), targets=following.clamp(min=0).reshape(-1))
    else:
        out.update(targets=targets, rows=rows)
    pin = torch.device(device).type == "cuda"
    if embedding is not None:
        ids = batch["input_ids"]
        out["inputs_embeds"] = torch.empty((*ids.shape, embedding.shape[1]), dtype=embedding.dtype, pin_memory=pin)
        torch.index_select(embedding, 0, ids.reshape(-1), out=out["inputs_embeds"].view(-1, embedding.shape[1]))
    out = {k: (v.pin_memory() if pin and not v.is_cuda else v).to(device, non_blocking=pin) if torch.is_tensor(v)
           else v for k, v in out.items()}
    return {**out, "n_tokens": targets.numel()}


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The decoder's final-norm hidden states (B, T, H) for a batch through to_device: minilora's fast layers
    (kernels/layer.py) for a model prepared with fast=True, unless the batch keeps a 2-D (left-padding) mask;
    else transformers' base model. A packed row's examples attend each to itself alone."""
    mask, starts = batch.get("attention_mask"), batch.get("segment_starts")
    segments = Segments(starts, batch["segment_longest"]) if starts is not None else None
    if is_fast(model) and mask is None:
        return model_forward(model, batch["input_ids"], segments, batch.get("position_ids"), batch.get("inputs_embeds"))
    if segments is not None:
        mask = segment_mask(starts, batch["input_ids"].shape[1])
    embeds = batch.get("inputs_embeds")
    return model.base_model(input_ids=None if embeds is not None else batch["input_ids"], inputs_embeds=embeds,
                            attention_mask=mask, position_ids=batch.get("position_ids"),
                            use_cache=False).last_hidden_state
