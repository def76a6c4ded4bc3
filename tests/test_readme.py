"""The README's "Use it" section as a user runs it: every ```python block, as written, in order, in one namespace,
in a fresh working directory (so "out/guanaco" lands there). Only two things stand in for the hub: load_model
loads the tiny checkpoint whatever name it gets (with the README's keyword arguments, but fp32 compute), and
load_rows returns tiny rows in guanaco-llama2-1k's format. The blocks are read from README.md itself, so an
edit to the README is what this runs."""

import json
import os

import torch
from safetensors.torch import load_file

import minilora as ml
from minilora.kernels.lora4bit import is_4bit
from minilora.loss import causal_lm_loss
from minilora.tiny import instruction_rows

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def use_it_blocks() -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block between "## Use it" and the next "## " heading."""
    lines = open(README, encoding="utf-8").read().splitlines()
    start = lines.index("## Use it")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, i = [], start
    while i < end:
        if lines[i].strip() == "```python":
            close = next(j for j in range(i + 1, end) if lines[j].strip() == "```")
            blocks.append((i + 2, "\n".join(lines[i + 1 : close])))
            i = close
        i += 1
    return blocks


def mean_loss(model, examples, pad_id: int) -> float:
    """Token-mean loss over the examples, in eval mode: no dropout, no gradient."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            loss_sum, n = ml.causal_lm_loss(model, ml.Collator(pad_id=pad_id)(examples[i : i + 8]))
            total, tokens = total + loss_sum.item(), tokens + n
    return total / tokens


def test_use_it_runs_as_written(base_dir, monkeypatch, tmp_path, capsys):
    real_load_model, loaded = ml.load_model, []

    def tiny_model(name_or_dir, **kwargs):  # the README's arguments, the tiny checkpoint
        loaded.append(name_or_dir)
        # computing in fp32 on a CPU: its bf16 matmuls are ~7x slower, and the blocks' code is the same
        return real_load_model(base_dir, **{**kwargs, "compute_dtype": torch.float32})

    monkeypatch.setattr(ml, "load_model", tiny_model)
    # 64 rows: 16 steps of 4 for the hand-written loop's epoch; train() goes round them for its 100 steps
    monkeypatch.setattr(ml, "load_rows", lambda source, **kwargs: instruction_rows(64, seed=1))
    monkeypatch.chdir(tmp_path)

    blocks = use_it_blocks()
    assert len(blocks) == 2, "the section has train() and a hand-written loop"
    ns = {"__name__": "readme"}
    for first_line, code in blocks:
        # padded so that a traceback names the README's own line numbers
        exec(compile("\n" * (first_line - 1) + code, README, "exec"), ns)
    printed = capsys.readouterr().out

    # both blocks loaded a model (through the stand-in): the loop trained a fresh one, not train()'s
    assert len(loaded) == 2

    # the first block: train() ran its 100 steps and wrote its adapter
    assert max(h["step"] for h in ns["history"]) == ns["cfg"].max_steps == 100
    adapter = tmp_path / "out/guanaco/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (64, 16, ["q_proj", "v_proj"])
    trained = load_file(adapter / "adapter_model.safetensors")
    assert trained and all(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # B moved off zero
    examples, stats = ns["data"]
    assert len(examples) == stats.rows == 64

    # the hand-written loop: its adapter learned something. Loaded onto a fresh base it lowers the loss of the
    # examples it trained on, against the same base with a fresh LoRA (B = 0: the base model itself). fp32 here,
    # so that the comparison is not blurred by bf16 rounding. The drop asked for, 0.01, is a fifth of the one
    # seen on the CPU (6.271 -> 6.219: 16 steps at lr 2e-4 on the random tiny base, whose loss starts near ln 512).
    saved = load_file(tmp_path / "out/adapter/adapter_model.safetensors")
    assert saved and all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    model, _ = real_load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, targets=("q_proj", "v_proj"), r=64, alpha=16, dropout=0.1)
    before = mean_loss(model, ns["examples"], ns["tok"].pad_token_id)
    ml.load_adapter(model, str(tmp_path / "out/adapter"))
    after = mean_loss(model, ns["examples"], ns["tok"].pad_token_id)
    assert after < before - 0.01, (before, after)
    assert "step 0: loss" in printed and "step 10: loss" in printed

    # the merged model: no LoRA and no 4-bit layer left, and an ordinary checkpoint on disk
    assert not any(isinstance(m, ml.LoRALinear) or is_4bit(m) for m in ns["model"].modules())
    merged = tmp_path / "out/merged"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    weights = load_file(merged / "model.safetensors")
    assert not any("lora_" in k or "quant" in k for k in weights)
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)

    assert "total (peak)" in printed  # the memory plan was printed


def test_causal_lm_loss_is_public():
    assert "causal_lm_loss" in ml.__all__ and ml.causal_lm_loss is causal_lm_loss
