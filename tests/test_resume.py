"""Nothing lost when a scheduler stops a run: resume names every checkpoint it cannot use and falls back to the one
before, a save never replaces one without a word, a save cut short leaves nothing for good, and a run that fails
before training leaves no directory behind."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minilora as ml
from minilora.adapter import CorruptFile
from minilora.rundir import claim, read_record
from minilora.tiny import instruction_rows

checkpoint_module = importlib.import_module("minilora.checkpoint")
ROWS = instruction_rows(16, seed=3)  # 4 micro-batches of 4 per epoch
DAMAGED = "cannot be read back: it is truncated or corrupt"


def config(out, **overrides):
    kw = dict(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1,
              precision="fp32", log_every=1, max_len=128, progress=False, seed=7, keep_last=10, save_every=2)
    return ml.TrainConfig(**{**kw, **overrides})


def run(base_dir, out, **overrides):
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    return ml.train(model, tok, ROWS, config(out, **overrides))


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps(history):
    return [h["step"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def straight(base_dir, tmp_path_factory):
    """A 6-step run that nothing stopped (LoRA dropout 0.1), with its checkpoint-2, -4 and -6."""
    out = tmp_path_factory.mktemp("straight")
    run(base_dir, out)
    return out


def copy_checkpoints(straight, out, *names):
    for name in names:
        shutil.copytree(straight / name, out / name)


def dead_pid() -> int:
    """The id of a process that has ended (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- resume names what it cannot use

def test_a_missing_training_state_is_named_resumed_before_and_replaced_with_a_word(base_dir, straight, tmp_path,
                                                                                   capsys):
    """checkpoint-4 lost its training_state.pt: resume names it, continues from checkpoint-2 bit for bit as if
    never stopped (dropout's RNG included), and the save at step 4 says it replaces it."""
    copy_checkpoints(straight, tmp_path, "checkpoint-2", "checkpoint-4")
    os.remove(tmp_path / "checkpoint-4" / "training_state.pt")
    capsys.readouterr()
    history = run(base_dir, tmp_path, resume="latest")
    out = capsys.readouterr().out
    assert (f"resume='latest': {tmp_path / 'checkpoint-4' / 'training_state.pt'} is missing; trying the checkpoint "
            "before it") in out
    assert "replacing checkpoint-4, which could not be resumed (training_state.pt is missing)" in out
    assert out.count("replacing") == 1  # checkpoint-6 is new
    assert steps(history) == [3, 4, 5, 6]
    assert same(adapter(straight / "adapter"), adapter(tmp_path / "adapter"))
    assert same(adapter(straight / "checkpoint-4"), adapter(tmp_path / "checkpoint-4"))
    assert os.path.isfile(tmp_path / "checkpoint-4" / "training_state.pt")


def test_each_checkpoint_with_a_file_missing_or_a_damaged_run_json_is_named_newest_first(straight, tmp_path,
                                                                                         capsys):
    copy_checkpoints(straight, tmp_path, "checkpoint-2", "checkpoint-4", "checkpoint-6")
    os.remove(tmp_path / "checkpoint-6" / "adapter_config.json")
    (tmp_path / "checkpoint-4" / "run.json").write_text('{"run_id": "cut sh')
    capsys.readouterr()
    held = claim(str(tmp_path), "latest")
    held.release()
    assert held.resume_from == str(tmp_path / "checkpoint-2")
    assert held.run_id == read_record(tmp_path / "checkpoint-2")["run_id"]
    assert capsys.readouterr().out.splitlines() == [
        f"resume='latest': {tmp_path / 'checkpoint-6' / 'adapter_config.json'} is missing; trying the checkpoint "
        "before it",
        f"resume='latest': {tmp_path / 'checkpoint-4' / 'run.json'} {DAMAGED}; trying the checkpoint before it"]

    # a checkpoint named explicitly must be usable: the error says why it is not
    with pytest.raises(ml.RunDirError, match=r"resume='.*checkpoint-4' cannot be resumed: .*checkpoint-4/run.json "
                                             "cannot be read back"):
        claim(str(tmp_path), str(tmp_path / "checkpoint-4"))
    # an unusable later checkpoint does not refuse the named one, and is remembered for the save that replaces it
    held = claim(str(tmp_path), str(tmp_path / "checkpoint-2"))
    held.release()
    assert held.unusable == {str(tmp_path / "checkpoint-4"): f"run.json {DAMAGED}",
                             str(tmp_path / "checkpoint-6"): "adapter_config.json is missing"}

    os.remove(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    capsys.readouterr()
    held = claim(str(tmp_path), "latest")
    held.release()
    assert held.resume_from is None
    out = capsys.readouterr().out
    assert "checkpoint-2/adapter_model.safetensors is missing; trying the checkpoint before it" in out
    assert out.splitlines()[-1] == f"resume='latest': no usable checkpoint in {tmp_path}, starting from step 0"


def test_a_damaged_adapter_is_named_and_a_named_checkpoint_that_cannot_load_is_an_error(base_dir, straight,
                                                                                       tmp_path, capsys):
    copy_checkpoints(straight, tmp_path, "checkpoint-2", "checkpoint-4")
    weights = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with pytest.raises(CorruptFile, match=f"^{weights} {DAMAGED}$"):  # named: no fallback, and nothing replaced
        run(base_dir, tmp_path, max_steps=4, resume=str(tmp_path / "checkpoint-4"))
    assert len(weights.read_bytes()) == 100
    capsys.readouterr()
    history = run(base_dir, tmp_path, max_steps=4, resume="latest")
    out = capsys.readouterr().out
    assert f"resume='latest': {weights} {DAMAGED}; trying the checkpoint before it" in out
    assert f"replacing checkpoint-4, which could not be resumed (adapter_model.safetensors {DAMAGED})" in out
    assert steps(history) == [3, 4] and len(adapter(tmp_path / "checkpoint-4")) == len(adapter(straight / "adapter"))


# ---------------------------------------------------------------- the leftovers of a save cut short

class Killed(BaseException):
    """What a process killed mid-save would leave: nothing of save_checkpoint's own clean-up runs."""


def test_a_save_cut_short_leaves_its_run_id_and_the_next_claim_removes_it(base_dir, straight, tmp_path,
                                                                          monkeypatch, capsys):
    real_save, saves = checkpoint_module.save_adapter, []

    def killed_in_the_second_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise Killed
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_adapter", killed_in_the_second_save)
    with pytest.raises(Killed):
        run(base_dir, tmp_path)
    monkeypatch.undo()
    leftover = tmp_path / f"checkpoint-4.tmp-{os.getpid()}"
    run_id = read_record(tmp_path / "checkpoint-2")["run_id"]
    assert read_record(leftover)["run_id"] == run_id  # run.json came first
    held = claim(str(tmp_path), "latest")  # this process lives: its dir is being written, as far as claim knows
    held.release()
    assert leftover.is_dir()

    dead = tmp_path / f"checkpoint-4.tmp-{dead_pid()}"
    leftover.rename(dead)
    capsys.readouterr()
    history = run(base_dir, tmp_path, resume="latest")
    assert f"removed {dead.name} from {tmp_path}: left by saves cut short" in capsys.readouterr().out
    assert not dead.exists() and steps(history) == [1, 2, 3, 4, 5, 6]  # 1, 2: the metrics it resumed
    assert same(adapter(straight / "adapter"), adapter(tmp_path / "adapter"))


def test_only_leftovers_of_this_run_whose_process_is_gone_are_removed(straight, tmp_path, capsys):
    copy_checkpoints(straight, tmp_path, "checkpoint-2")
    run_id = read_record(tmp_path / "checkpoint-2")["run_id"]
    sleeper = subprocess.Popen(["sleep", "60"])
    gone = dead_pid()

    def leftover(step, pid, owner):
        path = tmp_path / f"checkpoint-{step}.tmp-{pid}"
        path.mkdir()
        if owner:
            (path / "run.json").write_text(json.dumps({"run_id": owner, "step": step}))
        return path

    try:
        ours, fresh = leftover(4, gone, run_id), leftover(6, gone, None)  # removed: this run's, or nobody's yet
        other = leftover(8, gone, "another run")
        live = [leftover(10, os.getpid(), run_id), leftover(12, sleeper.pid, None)]
        (tmp_path / "checkpoint-14.tmp-x").mkdir()  # not a name a save writes
        capsys.readouterr()
        held = claim(str(tmp_path), "latest")
        held.release()
        assert capsys.readouterr().out.splitlines() == [
            f"removed {ours.name}, {fresh.name} from {tmp_path}: left by saves cut short (their processes are gone)"]
        assert not ours.exists() and not fresh.exists()
        assert other.is_dir() and all(p.is_dir() for p in live) and (tmp_path / "checkpoint-14.tmp-x").is_dir()

        held = claim(str(tmp_path), overwrite=True)  # replacing the run: any run's leftover goes, a live one stays
        held.release()
        assert not other.exists() and all(p.is_dir() for p in live) and (tmp_path / "checkpoint-14.tmp-x").is_dir()
        assert f"removed {other.name} from {tmp_path}" in capsys.readouterr().out
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- a run that fails before training

def test_a_run_that_fails_before_training_leaves_no_directory(base_dir, tmp_path):
    out = tmp_path / "new" / "out"
    claim(str(out)).release()
    assert not out.exists() and (tmp_path / "new").is_dir()  # the parent made on the way stays
    with pytest.raises(ml.RunDirError, match="does not exist"):
        claim(str(out), resume=str(tmp_path / "nowhere"))
    assert not out.exists()
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="match no linear layer"):  # add_lora refuses the targets after the claim
        ml.train(model, tok, ROWS, config(out, targets=("q_proj", "v_porj")))
    assert not out.exists()

    (tmp_path / "mine").mkdir()  # a directory that was there stays, and so does one the run wrote in
    claim(str(tmp_path / "mine")).release()
    held = claim(str(out))
    (out / "notes.txt").write_text("kept")
    held.release()
    assert (tmp_path / "mine").is_dir() and os.listdir(out) == ["notes.txt"]


# ---------------------------------------------------------------- a run resumed on another day

@pytest.fixture(scope="module")
def dated_base(tmp_path_factory):
    """A tiny Llama whose tokenizer's chat template writes today's date, as Llama 3.1's does."""
    from transformers import AutoModelForCausalLM

    from minilora.tiny import tiny_config
    from test_templates import LLAMA31_DATED, llama3_tokenizer

    base = tmp_path_factory.mktemp("dated")
    tok = llama3_tokenizer(LLAMA31_DATED)
    tok.save_pretrained(base)
    AutoModelForCausalLM.from_config(tiny_config(len(tok), bos_token_id=tok.bos_token_id,
                                                 eos_token_id=tok.eos_token_id)).save_pretrained(base)
    return base


def by_train(base, out, **overrides):
    model, tok = ml.load_model(str(base), quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.train(model, tok, ROWS, config(out, max_steps=4, **overrides))


def by_example(base, out, resume=None):
    """examples/train_guanaco.py, which encodes the rows before train() is called."""
    from test_examples import example

    rows = out.parent / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": r}) + "\n" for r in ROWS))
    assert example().main(["--model", str(base), "--dataset", str(rows), "--output-dir", str(out), "--eval-size", "0",
                           "--lora-r", "4", "--max-steps", "4", "--save-every", "2",
                           *(["--resume", resume] if resume else [])]) == 0


@pytest.mark.parametrize("trainer", [by_train, by_example], ids=["train", "example"])
def test_a_run_resumed_on_a_later_day_encodes_the_date_it_began_with(dated_base, tmp_path, monkeypatch, trainer):
    """A chat template that writes today's date (Llama 3.1's "Today Date") gives tomorrow's rows other ids than
    today's. The checkpoints record the day the run's examples were encoded with, and a resumed run encodes with
    it, in train() and in the example (which encodes before train()): resumed the next day, it ends with the
    adapter of the run that nothing stopped."""
    import minilora.template

    monkeypatch.setattr(minilora.template, "today", lambda: "2026-12-07")
    trainer(dated_base, tmp_path / "straight")
    record = read_record(tmp_path / "straight" / "checkpoint-2")
    assert record["day"] == "2026-12-07"
    monkeypatch.setattr(minilora.template, "today", lambda: "2026-12-08")
    copy_checkpoints(tmp_path / "straight", tmp_path / "resumed", "checkpoint-2")
    trainer(dated_base, tmp_path / "resumed", resume="latest")
    assert read_record(tmp_path / "resumed" / "checkpoint-4")["day"] == "2026-12-07"
    assert same(adapter(tmp_path / "resumed" / "adapter"), adapter(tmp_path / "straight" / "adapter"))
    # the day matters: encoded as of today, the rows are other data than the run began with
    tok = ml.load_tokenizer(str(dated_base))
    today = checkpoint_module.data_fingerprint(ml.encode_rows(ROWS, tok, record["config"]["max_len"])[0])
    assert today != record["shape"]["data"]
