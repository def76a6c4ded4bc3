"""The examples as a user runs them: in a subprocess, offline."""

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
