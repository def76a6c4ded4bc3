"""The chunked, supervised-only cross-entropy equals plain cross-entropy over full logits.

fp32 tolerance 1e-5 relative: both sum the same per-token losses; only the summation order differs.
"""

import pytest
import torch
import torch.nn.functional as F

from minilora.forward import supervised_positions
from minilora.loss import ChunkedCrossEntropy, causal_lm_loss


def supervised_ce(hidden, weight, labels, chunk_size=4096):
    """(summed loss, supervised tokens) of the loss's own pieces: the supervised positions found from the labels,
    their hidden rows through ChunkedCrossEntropy."""
    rows, targets = supervised_positions(labels, weight.shape[0])
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return ChunkedCrossEntropy.apply(selected, weight, targets, chunk_size), targets.numel()


def reference(hidden, weight, labels):
    logits = hidden @ weight.T  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def random_case(B=3, T=17, H=32, V=101):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.4] = -100  # prompts and padding
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_matches_full_logits_loss_and_grads(chunk):
    hidden, weight, labels = random_case()
    loss, n = supervised_ce(hidden, weight, labels, chunk_size=chunk)
    assert n == (labels[:, 1:] != -100).sum()
    g_h, g_w = torch.autograd.grad(loss * 0.37, (hidden, weight))
    ref = reference(hidden, weight, labels)
    r_h, r_w = torch.autograd.grad(ref * 0.37, (hidden, weight))
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert (g_h - r_h).norm() / r_h.norm() <= 1e-5
    assert (g_w - r_w).norm() / r_w.norm() <= 1e-5


def test_bf16_close_to_fp32():
    # bf16 matmuls round the logits to 8 mantissa bits: about 1e-2 relative on the summed loss at most
    hidden, weight, labels = random_case(H=64)
    loss32, _ = supervised_ce(hidden, weight, labels)
    loss16, _ = supervised_ce(hidden.bfloat16(), weight.bfloat16(), labels)
    assert torch.allclose(loss16, loss32, rtol=1e-2)


def test_no_supervised_token_gives_zero_with_zero_count():
    hidden, weight, labels = random_case()
    loss, n = supervised_ce(hidden, weight, torch.full_like(labels, -100))
    # the loop never divides by n == 0: encode_rows skips an example with no answer token in reach, so every
    # example has a supervised token (test_data.py::test_no_room_for_an_answer_is_skipped_and_counted)
    assert n == 0 and loss.item() == 0.0


def test_bad_label_is_an_error():
    hidden, weight, labels = random_case()
    labels[0, 3] = 5000
    with pytest.raises(ValueError, match="vocabulary size 101"):
        supervised_ce(hidden, weight, labels)


def test_causal_lm_loss_matches_hf(base_dir):
    import minilora as ml

    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, r=4, alpha=8)
    ids = torch.randint(3, 512, (2, 20))
    labels = ids.clone()
    labels[:, :6] = -100
    total, n = causal_lm_loss(model, {"input_ids": ids, "labels": labels})
    hf = model(input_ids=ids, labels=labels).loss  # HF's mean over supervised tokens
    assert torch.allclose(total / n, hf, rtol=1e-5)
