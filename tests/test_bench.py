"""benchmarks/step.py end to end on the CPU with the tiny shape: both implementations run and report.

No test asserts a speed: CPU timings of a tiny model say nothing about the GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("case", "impl", "lora", "batch", "seq", "status", "step_s", "tokens_per_s", "peak_alloc_gib",
          "peak_reserved_gib", "load_s", "trainable_params", "ids_checksum", "loss_first", "loss_last")


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--shape", "tiny", "--steps", "2", "--warmup", "1",
           "--impls", "minilora,peft,minilora+no_such_option,minilora@1", "--cases", "qv-r4-2x64", "--device", "cpu",
           "--model-dir", str(tmp / "model"), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_json_lines_for_both_impls(run):
    proc, _ = run
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"minilora", "peft", "minilora+no_such_option", "minilora@1"}
    for impl in ("minilora", "peft", "minilora@1"):
        r = by_impl[impl]
        assert r["status"] == "ok", r["status"]
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        assert r["batch"] == 2 and r["seq"] == 64 and r["finite"] and r["step_s"] > 0
        assert r["peak_alloc_gib"] is None  # CPU: no CUDA peak memory
    # same tokens, same trainable parameters, same starting loss (B = 0: both start at the base model)
    m, p = by_impl["minilora"], by_impl["peft"]
    assert m["ids_checksum"] == p["ids_checksum"] and m["trainable_params"] == p["trainable_params"]
    assert abs(m["loss_first"] - p["loss_first"]) < 1e-2  # bf16 autocast; the logits path differs slightly
    assert m["predicted_gib"] > 0 and "predicted_gib" not in p
    assert by_impl["minilora+no_such_option"]["status"].startswith("unavailable")
    # train()'s own step (fast layers, every one checkpointed off a GPU) starts from the same model
    planned = by_impl["minilora@1"]
    assert planned["ids_checksum"] == m["ids_checksum"] and abs(planned["loss_first"] - m["loss_first"]) < 1e-2
    assert planned["plan_options"]["fast"] and "no memory plan off a GPU" in planned["memory_plan"]
    assert "tok/s" in proc.stdout and "×peft" in proc.stdout  # the closing table


def test_result_file_and_readme_table(run):
    _, result = run
    for key in ("date", "card", "driver", "versions", "command", "peft_recipe", "cases"):
        assert key in result
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(result["versions"])
    assert len(result["cases"]) == 4
    md = _module("table").markdown_table(result)
    assert "| r4 qv | 2 × 64 | minilora |" in md and "PEFT tok/s" in md


def test_case_names_and_variants():
    step = _module("step")
    case = step.parse_case("all-r16-a32-d0.05-2x2048", scale=0.5)
    assert case["targets"][-1] == "down_proj" and case["r"] == 16 and case["alpha"] == 32
    assert case["dropout"] == 0.05 and (case["batch"], case["seq"]) == (2, 1024)
    assert step.variant_kwargs("minilora+fast+offload") == {"fast": True, "offload": True}
    assert step.impl_budget("minilora@4.6") == 4.6 and step.variant_kwargs("minilora@4.6") == {}
    assert step.impl_budget("minilora+offload") is None and step.impl_budget("minilora@") is None
    assert [step.parse_case(n)["name"] for n in step.STANDARD] == step.STANDARD
    with pytest.raises(SystemExit):
        step.parse_case("qv-64-4x512")


def test_epoch_benchmark_runs_minilora_and_peft_on_the_same_batches(tmp_path):
    """benchmarks/epoch.py on the CPU with the tiny shape: both impls run the same rows to the end and report.
    The rows have the real dataset's lengths: the word tokenizer encodes each turn to exactly them."""
    epoch = _module("epoch")
    out = tmp_path / "epoch.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "epoch.py"), "--shape", "tiny", "--rows", "12", "--device", "cpu",
           "--impls", "fast,peft", "--model-dir", str(tmp_path / "model"), "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    fast, peft = (next(c for c in result["cases"] if c["impl"] == name) for name in ("fast", "peft"))
    assert fast["status"] == peft["status"] == "ok"
    assert fast["steps"] == peft["steps"] == 3  # 12 rows at batch 4, one epoch
    assert fast["supervised_tokens"] == peft["supervised_tokens"] > 0 and fast["tokens"] == peft["tokens"]
    assert "fast layers" in fast["memory_plan"] and "x PEFT" in proc.stdout
    # the first row's turns, under the word tokenizer, have the lengths the file gives
    from minilora.template import encode_chat
    from minilora.model import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "model" / "word-tokenizer"))
    row = epoch.guanaco_rows(1, vocab_size=len(tok))[0]
    lengths = json.loads((ROOT / "benchmarks" / "guanaco-lengths.json").read_text())["lengths"][0]
    assert len(encode_chat(row, tok, max_len=4096)["input_ids"]) == sum(p + a for p, a in lengths)
