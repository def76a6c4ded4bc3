"""The examples as a user runs them: in a subprocess, offline."""

import copy
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
    # the smallest run that clears the demo's quality gate with a margin: 41% lower eval loss where 30% is asked
    result = run("examples/train_guanaco.py", "--preset", "tiny", "--max-steps", "40", "--pretrain-steps", "100",
                 "--eval-every", "20", "--output-dir", str(out))
    return out, result


def test_tiny_preset_trains_and_writes_an_adapter_peft_loads(demo):
    from peft import PeftModel
    from safetensors.torch import load_file

    import minilora as ml

    out, result = demo
    assert result.returncode == 0, result.stderr[-2000:]  # 1 would be the quality gate: eval loss down < 30%
    assert "held-out eval loss" in result.stdout and "before:" in result.stdout
    # a redirected log: plain lines, no progress bar and none of its carriage returns
    assert "\r" not in result.stdout + result.stderr and "pretrain base" not in result.stderr
    assert "predicted peak GPU memory" not in result.stdout  # a CPU run has no GPU plan to show
    adapter = out / "adapter"
    model, _ = ml.load_model(str(out / "base"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    peft = PeftModel.from_pretrained(model, str(adapter))
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():  # every saved tensor reached PEFT's model: no key silently missing
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


def test_chat_answers_alike_with_the_adapter_merged_and_saved_merged(demo, tmp_path):
    """The adapter on the 4-bit base, folded in (--merge), and written out with its tokenizer (--save-merged) then
    loaded alone, and with the 4-bit weights streamed from host memory (--stream): greedy answers are the same
    words. (fp32 on the CPU: the merged weight W + s B A differs from the unmerged sum by rounding alone, ~1e-7, far
    below any gap between the top two logits here.)"""
    out, _ = demo
    ask = ["--prompt", "Which is bigger, 3 or 8?", "--max-new-tokens", "12"]
    base = ["examples/chat.py", "--model", str(out / "base"), "--adapter", str(out / "adapter")]
    answers = {}
    for name, argv in [("adapter", base + ask), ("merge", base + ["--merge", *ask]),
                       ("save", base + ["--save-merged", str(tmp_path / "merged")]),
                       ("merged dir", ["examples/chat.py", "--model", str(tmp_path / "merged"), "--quant", "none",
                                       *ask]),
                       ("base", ["examples/chat.py", "--model", str(out / "base"), *ask])]:
        result = run(*argv)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        answers[name] = result.stdout.strip().splitlines()[-1]
    assert answers["adapter"] == answers["merge"] == answers["merged dir"] != answers["base"]
    streamed = run(*base, *ask, "--stream")  # the same weights, each layer copied in as it runs
    assert streamed.returncode == 0 and streamed.stdout.strip().splitlines()[-1] == answers["adapter"], streamed.stderr
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.model") or os.path.isfile(tmp_path / "merged" /
                                                                                      "tokenizer.json")


def test_chat_refuses_bad_input_before_the_model_loads(demo, tmp_path):
    out, _ = demo
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "adapter_model.safetensors").write_bytes((out / "adapter" /
                                                                        "adapter_model.safetensors").read_bytes())
    for argv, message in [(["--prompt", ""], "--prompt is empty"),
                          (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
                          (["--adapter", str(tmp_path / "no-config"), "--prompt", "hi"],
                           "no-config/adapter_config.json does not exist; an adapter dir holds adapter_config.json"),
                          (["--merge", "--prompt", "hi"], "give --adapter DIR"),
                          (["--model", str(tmp_path / "missing"), "--prompt", "hi"], "could not load model")]:
        argv = argv if "--model" in argv else ["--model", str(out / "base"), *argv]
        result = run("examples/chat.py", *argv)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_adapter_and_its_checkpoints_record_their_chat_template_and_chat_answers_in_it(demo, tmp_path):
    """train() records the template it trained under (the tiny tokenizer has no chat_template: auto is llama2)
    beside the adapter and in each checkpoint; chat.py answers in a recorded template without being told, so an
    adapter whose record says chatml is refused on this tokenizer, which lacks ChatML's tokens, where auto would
    silently answer in llama2; --save-merged carries the record into the merged model's directory."""
    from minilora.adapter import saved_template

    out, _ = demo
    assert saved_template(str(out / "adapter")) == "llama2"
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all(saved_template(str(c)) == "llama2" for c in checkpoints)
    chatml = tmp_path / "chatml"
    chatml.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (chatml / name).write_bytes((out / "adapter" / name).read_bytes())
    (chatml / "minilora_template.json").write_text('{"template": "chatml"}')
    result = run("examples/chat.py", "--model", str(out / "base"), "--adapter", str(chatml), "--prompt", "hi")
    assert result.returncode == 2 and "template 'chatml' needs the special token '<|im_start|>'" in result.stderr
    result = run("examples/chat.py", "--model", str(out / "base"), "--adapter", str(out / "adapter"),
                 "--save-merged", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert saved_template(str(tmp_path / "merged")) == "llama2"


def test_chat_picks_the_asked_then_the_recorded_template(tokenizer, capsys):
    """--template first (a warning where the record differs), then the record, then auto; a record of the tokenizer's
    own template (jinja:<hash>) must be this tokenizer's, and an unknown name is refused with what to pass."""
    chat = module("chat")
    assert chat.chat_template(None, None, tokenizer).name == "llama2"  # auto, without a chat_template
    assert chat.chat_template(None, "chatml", tokenizer).name == "chatml"
    assert capsys.readouterr().err == ""
    assert chat.chat_template("llama3", "chatml", tokenizer).name == "llama3"
    assert "trained under the chat template 'chatml'; answering in 'llama3'" in capsys.readouterr().err
    for record in ("jinja:0123456789ab", "mine"):
        with pytest.raises(ValueError, match=f"trained under the chat template '{record}', which this model's "
                                             "tokenizer does not have; pass --template"):
            chat.chat_template(None, record, tokenizer)
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    own = chat.chat_template(None, None, tok)
    assert own.name.startswith("jinja:") and chat.chat_template(None, own.name, tok) is own


def test_the_demo_fails_its_quality_gate_below_30_percent(capsys):
    ex = example()
    cfg = ex.ml.TrainConfig(output_dir="unused", sample_prompts=())
    assert ex.report([{"step": 0, "eval_loss": 4.0}, {"step": 9, "eval_loss": 2.9}], cfg, is_demo=True) == 1
    assert "expects the eval loss to fall by at least 30%" in capsys.readouterr().err
    assert ex.report([{"step": 0, "eval_loss": 4.0}, {"step": 9, "eval_loss": 2.7}], cfg, is_demo=True) == 0
    assert ex.report([{"step": 0, "eval_loss": 4.0}, {"step": 9, "eval_loss": 3.9}], cfg, is_demo=False) == 0


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

def module(name: str):
    """examples/NAME.py as a module, to call its parts without a subprocess."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def example():
    """examples/train_guanaco.py as a module."""
    return module("train_guanaco")


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
    # a redirected log: the plan, a plain line per log interval, the samples and the time account; no carriage return
    for line in ("fast layers, 2/2 checkpointed", "step 1/2 | loss ", "step 2/2 | loss ", "[step 2] 'What is a large "
                 "language model?' -> ", "time: set-up "):
        assert line in result.stdout, line
    assert "\r" not in result.stdout + result.stderr
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
    from transformers import ViTConfig

    ex = example()
    monkeypatch.setattr(ex.ml, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    ViTConfig(architectures=["ViTForImageClassification"]).save_pretrained(tmp_path / "vit")
    data = ["--dataset", str(messy), "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--model", str(tmp_path / "vit"), *data], "holds a 'vit' model (ViTForImageClassification), which "
         "transformers cannot load as a causal LM"),
        (["--model", base_dir, "--dataset", "nope_data"], "'nope_data' is not a file here and not a dataset on the hub"),
        (["--model", base_dir, "--strict", *data], "malformed row 9: no [/INST]"),
        (["--model", base_dir, "--eval-size", "19", *data], "eval size 19 holds out 19 of 19 rows"),
        (["--model", base_dir, "--max-len", "2", *data], "max_len=2 must be at least 64"),
        (["--model", base_dir, "--lr", "-1", *data], "lr=-1.0 must be a positive number"),
        (["--model", base_dir, "--epochs", "inf", *data], "epochs=inf must be a positive number"),
        (["--model", base_dir, "--targets", "q_proj,v_porj", *data], "['v_porj'] match no linear layer; the model's "
         "linear layers are ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"),
        (["--model", base_dir, "--targets", "", *data], "targets=[]: no target given"),
        (["--model", base_dir, "--resume", str(tmp_path / "nowhere"), *data], "nowhere' does not exist; pass a "
         "checkpoint-STEP dir, or 'latest'"),
        (["--model", base_dir, "--dataset", str(messy), "--output-dir", str(messy)], f"output_dir {messy} is a file"),
        (["--model", base_dir, "--dataset", str(messy), "--output-dir", str(messy / "sub")], "cannot write to output_dir"),
        (["--model", base_dir, "--dataset", str(messy), "--text-field", "prompt", "--messages-field", "chat", *data[2:]],
         "has neither 'prompt' nor 'chat'; its fields are ['text']; name the field with text_field= or messages_field= "
         "(--text-field or --messages-field)"),
        (["--preset", "tiny", "--model", base_dir], "--preset tiny builds its own model and data; drop --model"),
        (["--preset", "tiny", "--dataset", str(messy)], "--preset tiny builds its own model and data"),
    ] + [(["--eval-size", size, *data], "fraction strictly between 0 and 1") for size in ("1.0", "2.5", "-1")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            ex.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert [line for line in err.splitlines() if "error: " in line] == [err.splitlines()[-1]] or \
            "could not load" in err, err  # one error line (a load failure adds the offline hint after it)
    assert [ex.parse_args(["--eval-size", s]).eval_size for s in ("1", "2", "0.5", "0")] == [1, 2, 0.5, 0]

    args = ex.parse_args(["--model", base_dir, "--eval-size", "0", *data])
    cfg = ex.ml.TrainConfig(output_dir=args.output_dir, max_len=args.max_len, skip_malformed=not args.strict)
    _, _, _, train_data, eval_data = ex.load_data(args, cfg)
    assert eval_data is None and train_data[1].rows == 19  # 0: no held-out split at all


def test_a_used_output_dir_is_refused_or_resumed_as_asked_before_the_model_loads(messy, base_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    ex = example()
    out = ["--model", base_dir, "--dataset", str(messy), "--output-dir", str(tmp_path / "out"), "--eval-size", "0",
           "--lora-r", "4", "--max-steps", "2", "--save-every", "1"]
    assert ex.main(out) == 0
    capsys.readouterr()
    real_load = ex.ml.load_model
    monkeypatch.setattr(ex.ml, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    bad_line = len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) + 1
    with (tmp_path / "out" / "metrics.jsonl").open("a") as f:
        f.write("{not json\n{}\n")
    for extra, message in [
        ([], "already holds a run (checkpoint-1, checkpoint-2, adapter, train_config.json ...); continue it with "
             "resume='latest' (--resume latest), replace it with overwrite=True (--overwrite)"),
        (["--resume", "latest", "--overwrite"], "resume and overwrite exclude each other"),
        (["--resume", "latest"], f"metrics.jsonl, line {bad_line}, is not JSON; fix or delete that line to resume"),
    ]:
        with pytest.raises(SystemExit) as stop:
            ex.main(out + extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (extra, err)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "out" / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    for extra, message in [(["--batch-size", "8"], "this run differs in batch_size 4 -> 8"),
                           (["--lora-r", "8"], "lora_r 4 -> 8"), (["--seed", "1"], "seed 42 -> 1")]:
        with pytest.raises(SystemExit) as stop:
            ex.main(out + ["--resume", "latest", *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (extra, err)
    monkeypatch.setattr(ex.ml, "load_model", real_load)
    assert ex.main(out[:-4] + ["--max-steps", "3", "--resume", "latest", "--lr", "1e-3"]) == 0
    assert "with changed settings applied from here on: max_steps 2 -> 3; lr 0.0002 -> 0.001" in capsys.readouterr().out
    assert ex.main(out + ["--overwrite"]) == 0
    assert "overwrite: removed the earlier run's checkpoint-2, checkpoint-3, adapter" in capsys.readouterr().out


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_exits_with_the_resume_command_and_resumes_bit_exactly(messy, base_dir, tmp_path, monkeypatch,
                                                                             capsys, signum, status):
    """Ctrl-C, or a scheduler's SIGTERM: the step in progress ends, a checkpoint is saved, the command that resumes
    it is printed, and the exit status is 128 + the signal's number, as a shell reports it."""
    from safetensors.torch import load_file

    ex = example()
    step_module = importlib.import_module("minilora.step")
    common = ["--model", base_dir, "--dataset", str(messy), "--eval-size", "0", "--lora-r", "4", "--max-steps", "5"]
    assert ex.main(common + ["--output-dir", str(tmp_path / "straight")]) == 0  # LoRA dropout 0.1, the default
    real_loss, calls = step_module.causal_lm_loss, []

    def interrupted(model, batch, chunk):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real_loss(model, batch, chunk)

    monkeypatch.setattr(step_module, "causal_lm_loss", interrupted)
    capsys.readouterr()
    assert ex.main(common + ["--output-dir", str(tmp_path / "stopped")]) == status
    out, err = capsys.readouterr()
    assert "after step 3: saved" in err and "adapter:" not in out
    command = err.split("resume with:  python ")[1].strip().split()
    assert command[0] == "examples/train_guanaco.py" and command[-2:] == ["--resume", "latest"]
    monkeypatch.setattr(step_module, "causal_lm_loss", real_loss)
    assert ex.main(command[1:]) == 0
    a, b = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_run_ends_in_one_line(messy, base_dir, tmp_path, capsys):
    ex = example()
    with pytest.raises(SystemExit) as stop:
        ex.main(["--model", base_dir, "--dataset", str(messy), "--output-dir", str(tmp_path / "out"), "--eval-size",
                 "0", "--lora-r", "4", "--max-steps", "8", "--lr", "1e6"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "This run has saved no checkpoint yet; try a lower lr\n" in err and "bf16" not in err  # an fp32 run


def test_a_max_len_beyond_the_models_positions_warns_before_loading(messy, base_dir, tmp_path, monkeypatch, capsys):
    ex = example()

    def stop(*args, **kwargs):
        raise RuntimeError("stopped where the weights would load")

    monkeypatch.setattr(ex.ml, "load_model", stop)
    with pytest.raises(SystemExit):
        ex.main(["--model", base_dir, "--dataset", str(messy), "--output-dir", str(tmp_path / "out"), "--max-len",
                 "2048"])
    err = capsys.readouterr().err
    assert "warning: --max-len 2048 is beyond the 1024 positions this model was trained on" in err
    assert err.index("warning: --max-len") < err.index("stopped where the weights would load")


def test_the_examples_flags_are_trainconfigs_fields_with_their_defaults(capsys):
    """One source of defaults: each TrainConfig field has its flag, whose default is the field's and whose help
    is the field's comment in config.py."""
    import dataclasses

    ex = example()
    args = ex.parse_args([])
    for f in dataclasses.fields(ex.ml.TrainConfig):
        if f.name not in ex.OWN:
            assert getattr(args, f.name) == f.default, f.name
    parsed = ex.parse_args(["--no-cuda-graphs", "--gradient-checkpointing", "on", "--targets", "q_proj,o_proj",
                            "--lora-r", "8"])
    assert (parsed.cuda_graphs, parsed.gradient_checkpointing, parsed.targets, parsed.lora_r) == (
        False, True, ("q_proj", "o_proj"), 8)
    with pytest.raises(SystemExit):
        ex.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR the peak learning rate (default: 0.0002)" in help_text
    assert "--no-fast turn off: minilora's decoder layers" in help_text


def test_a_plan_that_streams_loads_in_host_memory_or_is_refused_when_the_host_lacks_it(monkeypatch, capsys):
    """Before anything loads: a 70B model under a 20 GiB budget streams its 4-bit weights (the resident plans need
    over 34 GiB), so the example loads it in host memory; where the host has less free memory than the plan pins
    there, it stops with one line that names both and the fix. (The plan alone: no GPU is touched.)"""
    from transformers import LlamaConfig

    script = example()
    config = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=32000)
    cfg = script.ml.TrainConfig(memory_budget_gib=20, precision="bf16", lora_r=64)
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(script.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else 200 * 2**30 // page)
    assert script.check_memory(config, cfg, "nf4", True, "cuda") is True
    assert script.check_memory(config, script.ml.TrainConfig(memory_budget_gib=60, precision="bf16"), "nf4", True,
                                "cuda") is False
    monkeypatch.setattr(script.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else 16 * 2**30 // page)
    with pytest.raises(SystemExit):
        script.check_memory(config, cfg, "nf4", True, "cuda")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "streams the 4-bit weights from host memory" in err[0] and "16.0 GiB free" in err[0]
    assert "--memory-budget-gib" in err[0]
