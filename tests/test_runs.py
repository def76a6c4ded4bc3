"""One run, one output directory: what a run writes and deletes, what it refuses, how it stops and resumes."""

import errno
import importlib
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from shutil import _ntuple_diskusage as shutil_usage
from safetensors.torch import load_file

import minilora as ml
from minilora.rundir import claim, latest_checkpoint
from minilora.stop import STOP_SIGNALS
from minilora.tiny import instruction_rows

step_module = importlib.import_module("minilora.step")  # where the loop calls the loss
checkpoint_module = importlib.import_module("minilora.checkpoint")
ROWS = instruction_rows(16, seed=3)  # 4 micro-batches of 4 per epoch


def config(out, **overrides):
    kw = dict(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1,
              precision="fp32", log_every=1, max_len=128, progress=False, seed=7, keep_last=10)
    return ml.TrainConfig(**{**kw, **overrides})


def run(base_dir, out, rows=ROWS, **overrides):
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    return ml.train(model, tok, rows, config(out, **overrides))


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def steps(history):
    return [h["step"] for h in history if "loss" in h]


# ---------------------------------------------------------------- write only what you own

def test_save_adapter_writes_its_two_files_and_touches_nothing_else(base_dir, tmp_path):
    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, r=4, alpha=8)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-3").mkdir()
    ml.save_adapter(model, tmp_path)  # a run directory given instead of its adapter/
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-3",
                                            "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(NotADirectoryError, match="is a file"):
        ml.save_adapter(model, tmp_path / "notes.txt")


def test_only_the_names_a_run_writes_are_its_checkpoints(base_dir, tmp_path):
    """A user's checkpoint-5-old/ or checkpoint-05/ (each holding a training state) is not a checkpoint of a
    run: the directory is free to train in, resume='latest' does not pick it, and training leaves it alone."""
    for name in ("checkpoint-5-old", "checkpoint-05"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_state.pt").write_text("mine")
    assert latest_checkpoint(str(tmp_path)) is None
    run(base_dir, tmp_path, max_steps=2)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    run(base_dir, tmp_path, max_steps=2, overwrite=True)
    for name in ("checkpoint-5-old", "checkpoint-05"):
        assert (tmp_path / name / "training_state.pt").read_text() == "mine"


def test_a_second_run_into_a_used_directory_is_refused_and_overwrite_replaces_it(base_dir, tmp_path, capsys):
    run(base_dir, tmp_path, max_steps=4, save_every=2)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ml.RunDirError, match=r"already holds a run \(checkpoint-2, checkpoint-4, adapter, "
                                             r"train_config.json ...\); continue it with resume='latest'"):
        run(base_dir, tmp_path, max_steps=2)
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ml.RunDirError):  # refused before the model is touched
        ml.train(model, tok, ROWS, config(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    capsys.readouterr()
    history = run(base_dir, tmp_path, max_steps=3, overwrite=True)
    assert "overwrite: removed the earlier run's checkpoint-2, checkpoint-4, adapter, train_config.json, " \
           "metrics.jsonl" in capsys.readouterr().out
    assert steps(history) == [1, 2, 3]
    assert set(os.listdir(tmp_path)) - {"loss.png"} == {"adapter", "checkpoint-3", "metrics.jsonl", "notes.txt",
                                                        "train_config.json"}
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-3")  # resume='latest' continues the new run
    with pytest.raises(ml.RunDirError, match="resume and overwrite exclude each other"):
        run(base_dir, tmp_path, resume="latest", overwrite=True)


def test_a_running_directory_is_locked_against_another_process(base_dir, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from minilora.rundir import claim; claim(sys.argv[1]); print('held', flush=True); "
        "time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ml.RunDirError, match=rf"is in use by process {holder.pid} on .*; wait for it"):
            run(base_dir, tmp_path, max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    # the owner died without releasing: its lock went with it
    history = run(base_dir, tmp_path, max_steps=1)
    assert steps(history) == [1] and not (tmp_path / ".minilora.lock").exists()


def test_pruning_removes_only_this_runs_checkpoints(base_dir, tmp_path):
    run(base_dir, tmp_path / "a", max_steps=4, save_every=2)  # another run's checkpoint-2 and -4
    run(base_dir, tmp_path / "b", max_steps=6, save_every=6)
    history = run(base_dir, tmp_path / "a", max_steps=10, save_every=2, keep_last=1,
                  resume=str(tmp_path / "b" / "checkpoint-6"))
    assert steps(history)[-1] == 10
    names = sorted(n for n in os.listdir(tmp_path / "a") if n.startswith("checkpoint"))
    assert names == ["checkpoint-10", "checkpoint-2", "checkpoint-4"]


# ---------------------------------------------------------------- resume checks what it continues

def test_resume_refuses_a_checkpoint_of_another_shape(base_dir, tmp_path):
    run(base_dir, tmp_path, max_steps=2, save_every=2)
    for change, message in [(dict(batch_size=8), "batch_size 4 -> 8"), (dict(lora_r=8), "lora_r 4 -> 8"),
                            (dict(seed=1), "seed 7 -> 1"), (dict(max_len=96), "max_len 128 -> 96")]:
        with pytest.raises(ml.ResumeMismatch, match=f"cannot resume from .*checkpoint-2: this run differs in .*"
                                                     f"{message}"):
            run(base_dir, tmp_path, max_steps=4, resume="latest", **change)
    with pytest.raises(ml.ResumeMismatch, match="data '[0-9a-f]+' -> '[0-9a-f]+' \\(the encoded examples: other rows"):
        run(base_dir, tmp_path, rows=instruction_rows(16, seed=4), max_steps=4, resume="latest")
    rec = checkpoint_module.run_shape(config(tmp_path), [], None, 2)
    held = claim(str(tmp_path), "latest")
    with pytest.raises(ml.ResumeMismatch, match="processes 1 -> 2"):
        checkpoint_module.check_resume(held, rec, config(tmp_path))
    held.release()


def test_resume_applies_a_changed_lr_and_says_so(base_dir, tmp_path, capsys):
    common = dict(max_steps=8, warmup_ratio=0.25, save_every=4, lora_dropout=0.0)
    straight = run(base_dir, tmp_path / "straight", lr=1e-3, **common)
    run(base_dir, tmp_path / "changed", lr=2e-2, **{**common, "max_steps": 4})
    capsys.readouterr()
    resumed = run(base_dir, tmp_path / "changed", lr=1e-3, resume="latest", **common)
    out = capsys.readouterr().out
    assert "with changed settings applied from here on: max_steps 4 -> 8; lr 0.02 -> 0.001" in out
    lrs = {h["step"]: h["lr"] for h in straight if "lr" in h}
    assert {h["step"]: h["lr"] for h in resumed if "lr" in h and h["step"] > 4} == {s: lrs[s] for s in range(5, 9)}
    assert json.loads((tmp_path / "changed" / "train_config.json").read_text())["lr"] == 1e-3


def test_resume_errors_come_before_the_model(base_dir, tmp_path):
    with pytest.raises(ml.RunDirError, match="resume='.*nowhere' does not exist; pass a checkpoint-STEP dir"):
        claim(str(tmp_path / "out"), str(tmp_path / "nowhere"))
    run(base_dir, tmp_path / "a", max_steps=2, save_every=1)
    with (tmp_path / "a" / "metrics.jsonl").open("a") as f:
        f.write("garbage\n" + json.dumps({"step": 9}) + "\n")
    with pytest.raises(ml.RunDirError, match=r"metrics.jsonl, line \d+, is not JSON; fix or delete that line"):
        claim(str(tmp_path / "a"), "latest")
    with pytest.raises(ml.RunDirError, match="holds checkpoint-2, later than .*checkpoint-1"):
        claim(str(tmp_path / "a"), str(tmp_path / "a" / "checkpoint-1"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ml.RunDirError, match="output_dir .*file is a file"):
        claim(str(tmp_path / "file"))
    with pytest.raises(ml.RunDirError, match="cannot write to output_dir .*file/sub"):
        claim(str(tmp_path / "file" / "sub"))


# ---------------------------------------------------------------- stops: Ctrl-C, NaN, a full disk

@pytest.fixture(scope="module")
def straight(base_dir, tmp_path_factory):
    """The adapter of a 6-step run that nothing stopped (LoRA dropout 0.1)."""
    out = tmp_path_factory.mktemp("straight")
    run(base_dir, out, max_steps=6)
    return adapter(out / "adapter")


def signal_at(calls: dict, monkeypatch):
    """Make the loss send each signal of calls {micro-batch number: signal} to this process during that
    micro-batch's forward."""
    real_loss, seen = step_module.causal_lm_loss, []

    def signalled(model, batch, chunk):
        seen.append(1)
        if len(seen) in calls:
            os.kill(os.getpid(), calls[len(seen)])
        return real_loss(model, batch, chunk)

    monkeypatch.setattr(step_module, "causal_lm_loss", signalled)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1],
                         ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_saves_a_checkpoint_that_resumes_bit_exactly_with_dropout(base_dir, tmp_path, monkeypatch,
                                                                                straight, signum):
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    signal_at({4: signum}, monkeypatch)  # in the middle of step 4's forward
    with pytest.raises(ml.Interrupted, match=f"stopped by {signal.Signals(signum).name} after step 4: saved "
                                             ".*checkpoint-4; resume it") as stop:
        run(base_dir, tmp_path, max_steps=6)
    assert stop.value.checkpoint == str(tmp_path / "checkpoint-4") and stop.value.exit_status == 128 + signum
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == handlers  # handed back
    monkeypatch.undo()
    assert not (tmp_path / "adapter").exists()
    history = run(base_dir, tmp_path, max_steps=6, resume="latest")
    assert steps(history) == [1, 2, 3, 4, 5, 6]
    resumed = adapter(tmp_path / "adapter")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # the RNG went on as if never stopped


def test_a_second_signal_stops_at_once(base_dir, tmp_path, monkeypatch):
    """SIGTERM in step 2's first micro-batch, then Ctrl-C in its second: the run stops there, in the step, and
    saves nothing more; checkpoint-1 stays the last."""
    before = signal.getsignal(signal.SIGINT)
    signal_at({3: signal.SIGTERM, 4: signal.SIGINT}, monkeypatch)
    with pytest.raises(ml.Interrupted, match="SIGINT after SIGTERM: stopped at once; the steps since the last "
                                             "checkpoint are lost") as stop:
        run(base_dir, tmp_path, max_steps=6, grad_accum=2, batch_size=2, save_every=1)
    assert stop.value.checkpoint is None and stop.value.exit_status == 130
    assert [n for n in os.listdir(tmp_path) if n.startswith("checkpoint")] == ["checkpoint-1"]
    assert signal.getsignal(signal.SIGINT) is before  # handed back


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "no-progress"])
def test_a_bar_on_a_terminal_and_plain_lines_without(base_dir, tmp_path, monkeypatch, capsys, progress):
    """On a terminal with progress=True, a progress bar on stderr; with progress=False (and without a terminal:
    test_examples), a plain line per log interval. Both print the data summary, the plan and the time account."""
    monkeypatch.setattr(sys, "stderr", Terminal())
    run(base_dir, tmp_path, max_steps=2, progress=progress)
    out, err = capsys.readouterr().out, sys.stderr.getvalue()
    for line in ("16 examples from 16 rows", "fast layers, 2/2 checkpointed", "time: set-up "):
        assert line in out
    assert ("step 2/2 | loss " in out) != progress and ("train: 100%" in err) == progress
    assert "\r" not in out


def test_nan_stop_names_this_runs_last_checkpoint_or_none(base_dir, tmp_path, monkeypatch):
    real_loss, calls = step_module.causal_lm_loss, []

    def poisoned(model, batch, chunk):
        calls.append(1)
        loss, n = real_loss(model, batch, chunk)
        return (loss * float("nan") if len(calls) >= 3 else loss), n

    monkeypatch.setattr(step_module, "causal_lm_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step 3.*The last good checkpoint is .*/a/checkpoint-2; "
                                                 r"try a lower lr$"):
        run(base_dir, tmp_path / "a", max_steps=6, save_every=2)
    assert [d for d in os.listdir(tmp_path / "a") if d.startswith("checkpoint")] == ["checkpoint-2"]
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / "a" / "checkpoint-2").values())
    calls.clear()
    with pytest.raises(FloatingPointError, match="This run has saved no checkpoint yet; try a lower lr, or bf16"):
        run(base_dir, tmp_path / "b", max_steps=6, precision="fp16")


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_a_full_disk_names_the_checkpoint_and_keeps_the_one_before(base_dir, tmp_path, monkeypatch, failure):
    real_save, calls = torch.save, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint meets a full disk
            raise failure
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    if isinstance(failure, RuntimeError):  # torch's own message does not say why: the free space does
        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: shutil_usage(0, 0, 0))
    with pytest.raises(ml.CheckpointWriteError, match=r"could not write .*checkpoint-4: the disk is full; the "
                                                      r"previous checkpoint .*checkpoint-2 is intact"):
        run(base_dir, tmp_path, max_steps=6, save_every=2)
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == [
        "checkpoint-2", "metrics.jsonl", "train_config.json"]
    history = run(base_dir, tmp_path, max_steps=6, save_every=2, resume="latest")
    assert steps(history) == [1, 2, 3, 4, 5, 6]


def test_every_target_must_match_a_linear_layer(base_dir):
    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    layers = r"the model's linear layers are \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', " \
             r"'v_proj'\]"
    for targets, why in [(("q_proj", "v_porj"), r"\['v_porj'\] match no linear layer"),
                         (("",), r"\[''\] match no linear layer"), ((), "no target given"),
                         (("lm_head",), r"lm_head cannot carry LoRA here \(the loss reads its weight directly\)")]:
        with pytest.raises(ValueError, match=f"{why}; {layers}$"):
            ml.add_lora(model, targets=targets)
    assert not [m for m in model.modules() if isinstance(m, ml.LoRALinear)]
