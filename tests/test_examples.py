"""The examples as a user runs them: in a subprocess, offline."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run("examples/train_guanaco.py", "--preset", "tiny", "--max-steps", "6", "--pretrain-steps", "20",
                 "--eval-every", "3", "--output-dir", str(out))
    return out, result


def test_tiny_preset_trains_and_writes_an_adapter_peft_loads(demo):
    from peft import PeftModel
    from safetensors.torch import load_file

    import minilora as ml

    out, result = demo
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: the loss fell less than 30% in 6 steps
    assert "held-out eval loss" in result.stdout and "before:" in result.stdout
    assert "pretrain base" in result.stderr  # the base's pretraining shows a progress bar
    assert "predicted peak GPU memory" not in result.stdout  # a CPU run has no GPU plan to show
    adapter = out / "adapter"
    model, _ = ml.load_model(str(out / "base"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    peft = PeftModel.from_pretrained(model, str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():  # every saved tensor reached PEFT's model: no key silently missing
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


def test_chat_answers_with_the_adapter(demo):
    out, _ = demo
    for extra in ([], ["--merge"]):
        result = run("examples/chat.py", "--model", str(out / "base"), "--adapter", str(out / "adapter"),
                     "--prompt", "Which is bigger, 3 or 8?", "--max-new-tokens", "8", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip()


def test_unreachable_model_gives_a_message_not_a_traceback(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "<s>[INST] hi [/INST] hello </s>"}\n' * 3)
    result = run("examples/train_guanaco.py", "--model", str(tmp_path / "no-such-model"), "--dataset", str(rows),
                 "--output-dir", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 2
    assert "could not load model" in result.stderr and "--preset tiny" in result.stderr
    assert "no-such-model' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = run("examples/train_guanaco.py", "--dataset", str(tmp_path / "missing.jsonl"), timeout=300)
    assert result.returncode == 2 and "could not load dataset" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- real-world data and bad input

def example():
    """examples/train_guanaco.py as a module, to call its parts without a subprocess."""
    spec = importlib.util.spec_from_file_location("train_guanaco", os.path.join(ROOT, "examples", "train_guanaco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A guanaco-format .jsonl as real data comes: an empty question, an empty answer, three malformed rows."""
    from minilora.tiny import instruction_rows

    good = instruction_rows(14, seed=5)
    rows = good[:7] + [
        "<s>[INST] Hi [/INST] Hello! </s><s>[INST]  [/INST] Anything else? </s><s>[INST] No [/INST] Bye. </s>",
        "<s>[INST] Say nothing. [/INST]  </s>",
        "just some text",  # 9: no [/INST]
        "<s>[INST] q [/INST] a </s> and more",  # 10: text after the last </s>
        42,  # 11: not a string
    ] + good[7:]
    path = tmp_path_factory.mktemp("messy") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return path


def test_messy_dataset_trains_with_counts(messy, base_dir, tmp_path):
    out = tmp_path / "out"
    result = run("examples/train_guanaco.py", "--model", base_dir, "--dataset", str(messy), "--output-dir", str(out),
                 "--max-steps", "2", "--eval-size", "0", "--lora-r", "4", "--log-every", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("skipped 3 malformed rows of 19: 9 (no [/INST]), 10 (text after the last </s>), 11 (expected a guanaco "
            "string") in result.stdout
    assert "16 examples from 19 rows" in result.stdout and "empty questions: 1, empty answers: 1" in result.stdout
    assert "predicted peak GPU memory" not in result.stdout  # a CPU run has no GPU plan to show
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["empty_questions"], start["empty_answers"], start["examples"]) == (1, 1, 16)
    assert not any("eval_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_inspect_shows_the_counts(messy, tok_dir, monkeypatch, capsys):
    import runpy

    def inspect(*extra):
        monkeypatch.setattr(sys, "argv", ["minilora", "inspect", str(messy), "--tokenizer", tok_dir, *extra])
        runpy.run_module("minilora", run_name="__main__")  # python -m minilora inspect ...

    inspect("--skip-malformed")
    out = capsys.readouterr().out
    assert "rows: 19\n" in out and "empty questions: 1\nempty answers: 1\n" in out
    assert "skipped rows: 3\n" in out and "malformed rows: 9, 10, 11\n" in out
    with pytest.raises(SystemExit) as stop:
        inspect()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "error: malformed row 9: no [/INST]" in err and "Traceback" not in err
    bad = messy.parent / "bad.jsonl"
    bad.write_text(messy.read_text() + "\n" + '{"text": "<s>[INST] cut' + "\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["minilora", "inspect", str(bad), "--tokenizer", tok_dir])
    with pytest.raises(SystemExit):
        runpy.run_module("minilora", run_name="__main__")
    assert "bad.jsonl', line 21 column" in capsys.readouterr().err


def test_bad_input_gets_one_line_and_exit_2_before_any_model_loads(messy, base_dir, tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config

    ex = example()
    monkeypatch.setattr(ex.ml, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    data = ["--dataset", str(messy), "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--model", str(tmp_path / "gpt2"), *data], "holds a 'gpt2' model (GPT2LMHeadModel)"),
        (["--model", base_dir, "--dataset", "nope_data"], "'nope_data' is not a file here and not a dataset on the hub"),
        (["--model", base_dir, "--strict", *data], "malformed row 9: no [/INST]"),
        (["--model", base_dir, "--eval-size", "19", *data], "eval size 19 holds out 19 of 19 rows"),
        (["--model", base_dir, "--max-len", "2", *data], "max_len=2 must be at least 64"),
        (["--model", base_dir, "--lr", "-1", *data], "lr=-1.0 must be a positive number"),
    ] + [(["--eval-size", size, *data], "fraction strictly between 0 and 1") for size in ("1.0", "2.5", "-1")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            ex.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert [ex.parse_args(["--eval-size", s]).eval_size for s in ("1", "2", "0.5", "0")] == [1, 2, 0.5, 0]

    args = ex.parse_args(["--model", base_dir, "--eval-size", "0", *data])
    cfg = ex.ml.TrainConfig(output_dir=args.output_dir, max_len=args.max_len)
    _, _, _, train_data, eval_data = ex.load_data(args, cfg)
    assert eval_data is None and train_data[1].rows == 19  # 0: no held-out split at all
