"""A collated batch made ready on the device (to_device: on_host, then copy_to), and the decoder run on it
(final_hidden): minilora's fast layers where the model has them, else transformers' own decoder."""

from __future__ import annotations

import torch

from .kernels.attention import Segments, segment_mask
from .kernels.layer import is_fast, model_forward
from .kernels.offload import embed, host_embedding
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


def on_host(batch: dict, vocab_size: int) -> dict:
    """A collated CPU batch made ready for causal_lm_loss, still on the host: "rows" (indices of the supervised
    positions) and "targets" for the loss, "n_tokens" (an int) counting them, found here so that the host never
    waits for the GPU. A 2-D attention_mask that is right padding is dropped: a causal model never attends to
    later positions, so right padding changes no supervised output, and without a mask attention runs as plain
    causal (flash attention, no (T, T) mask). Any other mask (left padding) is kept; a packed row's segment_starts
    too."""
    rows, targets = supervised_positions(batch["labels"], vocab_size)
    out = {k: v for k, v in batch.items() if k != "labels"}
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() == 2 and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        del out["attention_mask"]
    return {**out, "targets": targets, "rows": rows, "n_tokens": targets.numel()}


def copy_to(batch: dict, device) -> dict:
    """The batch's tensors on `device`; to a GPU through pinned memory, asynchronously (the host does not wait)."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and not v.is_cuda else v).to(device, non_blocking=pin) if torch.is_tensor(v)
            else v for k, v in batch.items()}


def to_device(batch: dict, device, vocab_size: int) -> dict:
    """A collated CPU batch, ready for causal_lm_loss on `device` (on_host, then copy_to)."""
    return copy_to(on_host(batch, vocab_size), device)


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The decoder's final-norm hidden states (B, T, H) for a batch through to_device: minilora's fast layers
    (kernels/layer.py) for a model prepared with fast=True, unless the batch keeps a 2-D (left-padding) mask;
    else transformers' base model. A packed row's examples attend each to itself alone."""
    mask, starts = batch.get("attention_mask"), batch.get("segment_starts")
    segments = Segments(starts, batch["segment_longest"]) if starts is not None else None
    embeds = batch.get("inputs_embeds")
    if embeds is None and host_embedding(model) is not None:
        embeds = embed(model, batch["input_ids"])  # the table's rows, gathered where it is (a wait for the ids)
    if is_fast(model) and mask is None:
        return model_forward(model, batch["input_ids"], segments, batch.get("position_ids"), embeds)
    if segments is not None:
        mask = segment_mask(starts, batch["input_ids"].shape[1])
    return model.base_model(input_ids=None if embeds is not None else batch["input_ids"], inputs_embeds=embeds,
                            attention_mask=mask, position_ids=batch.get("position_ids"),
                            use_cache=False).last_hidden_state
