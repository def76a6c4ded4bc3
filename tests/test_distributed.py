"""Data-parallel training through torch.distributed, on the CPU: 2 gloo processes against one process at twice
the batch, resume of a 2-process run (and of one that a signal stopped), packed steps sharded and replicated, the
example under torchrun (and a SIGTERM to it), and a process group of one.

Tolerance 1e-5 relative on the LoRA weights (fp32, dropout 0): both compute the gradient of the same loss over
the same examples; the 2 processes sum two partial gradients where one process sums over one batch, so only
the order of additions differs, through Adam.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import minilora as ml
from minilora.tiny import instruction_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
ROWS = instruction_rows(18, seed=3)  # 18 rows: the last global batch of 4 is short, one process gets none
EVALS = instruction_rows(5, seed=9)  # 5 rows, 3 sample prompts: shared unevenly by 2 processes
PROMPTS = ("Which is bigger, 3 or 8?", "What is the opposite of fast?", "Repeat after me: moon ship bread")
COMMON = dict(max_steps=5, lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, precision="fp32", log_every=1,
              max_len=128, progress=False, seed=7, save_every=2, keep_last=10, group_by_length=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, base_dir, out, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
        overrides = dict(overrides)
        evals = overrides.pop("evals", None)
        signalled, call, signum = overrides.pop("signal", (None, 0, 0))
        if rank == signalled:  # this process alone gets `signum` during its micro-batch number `call`
            _signal_at(call, signum)
        try:
            history = ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=out, **{**COMMON, **overrides}), evals)
        except ml.Interrupted as e:
            with open(os.path.join(out, f"process-{rank}.json"), "w") as f:
                json.dump({"interrupted": str(e), "checkpoint": e.checkpoint, "signal": e.signal}, f)
            return
        held = {"history": history, "bytes": _parameter_bytes(model)}
        try:  # a sharded model's own weights are parts: saving them is refused, with the way to do it
            ml.save_adapter(model, os.path.join(out, f"own-{rank}"))
        except ValueError as e:
            held["save_adapter"] = str(e)
        with open(os.path.join(out, f"process-{rank}.json"), "w") as f:
            json.dump(held, f)
    finally:
        dist.destroy_process_group()


def _signal_at(call: int, signum: int):
    """Send `signum` to this process during its micro-batch number `call` (counting from 1)."""
    import importlib

    step_module, calls = importlib.import_module("minilora.step"), []
    real_loss = step_module.causal_lm_loss

    def signalled(model, batch, chunk):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real_loss(model, batch, chunk)

    step_module.causal_lm_loss = signalled


def _parameter_bytes(model) -> dict:
    """{"frozen" | "lora": [bytes this process holds, bytes of the whole tensors]}: shards for a sharded model."""
    from torch.distributed.tensor import DTensor

    held = {"frozen": [0, 0], "lora": [0, 0]}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        kind = held["lora" if p.requires_grad else "frozen"]
        kind[0] += local.numel() * local.element_size()
        kind[1] += p.numel() * p.element_size()
    return held


def data_parallel(base_dir, out, **overrides):
    mp.spawn(_worker, args=(2, _port(), base_dir, str(out), overrides), nprocs=2)


def single(base_dir, out, evals=None, **overrides):
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    return ml.train(model, tok, ROWS, ml.TrainConfig(output_dir=str(out), **{**COMMON, **overrides}), evals)


def adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "fsdp"])
def test_two_processes_train_what_one_does_at_twice_the_batch(base_dir, tmp_path, sharded):
    # 5 steps of global batch 4 over 18 rows, two micro-batches a step: an epoch of 5 batches, the last one of 2
    # rows (process 1's share of it is empty), then the second epoch begins. The processes share evaluation and
    # the samples (each takes every other row and prompt) and log what one process does. fsdp: the 4-bit base
    # and LoRA weights are sharded, half on each process, through transformers' layers (as the one process
    # here); evaluation and the samples then run whole on both processes, since each forward needs both halves
    both = dict(evals=EVALS, sample_prompts=PROMPTS, sample_max_new_tokens=6, grad_accum=2,
                **(dict(fast=False) if sharded else {}))
    data_parallel(base_dir, tmp_path / "ddp", batch_size=2, **(dict(both, fsdp=True) if sharded else both))
    history = single(base_dir, tmp_path / "one", batch_size=4, **both)
    a, b = adapter(tmp_path / "one" / "adapter"), adapter(tmp_path / "ddp" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k
    # process 0 alone wrote: one metrics file, one config, one checkpoint series, one adapter
    written = sorted(set(os.listdir(tmp_path / "ddp")) - {"process-0.json", "process-1.json", "own-0", "own-1"})
    assert written == sorted(os.listdir(tmp_path / "one"))
    assert {"adapter", "checkpoint-2", "checkpoint-4", "checkpoint-5", "metrics.jsonl", "train_config.json"} <= set(
        written) <= {"adapter", "checkpoint-2", "checkpoint-4", "checkpoint-5", "metrics.jsonl", "train_config.json",
                     "loss.png"}
    lines = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    ddp_losses = [r["loss"] for r in lines if "loss" in r]
    assert len(ddp_losses) == 5  # one line per step, not one per process
    # the logged loss is the global step's, as one process logs it
    assert ddp_losses == pytest.approx([h["loss"] for h in history if "loss" in h], rel=1e-5)
    # the grad norm before clipping is scale-sensitive (Adam and clipping would hide a gradient off by a factor)
    assert [r["grad_norm"] for r in lines if "loss" in r] == pytest.approx(
        [h["grad_norm"] for h in history if "loss" in h], rel=1e-5)
    assert [r["eval_loss"] for r in lines if "eval_loss" in r] == pytest.approx(
        [h["eval_loss"] for h in history if "eval_loss" in h], rel=1e-5)
    assert [(r["prompt"], r["sample"]) for r in lines if "sample" in r] == [
        (h["prompt"], h["sample"]) for h in history if "sample" in h]
    held = [json.load(open(tmp_path / "ddp" / f"process-{r}.json")) for r in (0, 1)]
    assert all(("full_lora_weights(model)" in h.get("save_adapter", "")) == sharded for h in held)
    for kind in ("frozen", "lora"):  # each process holds half of every weight (shards padded to equal size)
        mine, whole = zip(*(h["bytes"][kind] for h in held))
        assert whole[0] == whole[1] and (sum(mine) >= whole[0] and max(mine) <= 0.51 * whole[0] if sharded
                                         else mine == whole), (kind, mine, whole)


def test_two_processes_train_a_qwen2_as_one_process_at_twice_the_batch(qwen2_dir, tmp_path):
    """Another family than LLaMA's own (Qwen2: q, k, v biases, tied embeddings) on the fast layers, data-parallel:
    what one process trains at twice the batch, within 1e-5."""
    data_parallel(qwen2_dir, tmp_path / "ddp", batch_size=2, save_every=10)
    single(qwen2_dir, tmp_path / "one", batch_size=4, save_every=10)
    a, b = adapter(tmp_path / "one" / "adapter"), adapter(tmp_path / "ddp" / "adapter")
    assert a.keys() == b.keys() and any("q_proj" in k for k in a)
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "fsdp"])
def test_two_process_resume_is_bit_exact(base_dir, tmp_path, sharded):
    # fsdp: each checkpoint holds the full LoRA weights and optimizer state, gathered to process 0, and the
    # resumed processes take their shards of them
    kw = dict(fsdp=True, fast=False) if sharded else {}
    data_parallel(base_dir, tmp_path / "straight", batch_size=2, **kw)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    data_parallel(base_dir, tmp_path / "resumed", batch_size=2, resume="latest", **kw)
    a, b = adapter(tmp_path / "straight" / "adapter"), adapter(tmp_path / "resumed" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if not sharded:
        # SIGTERM reaches process 1 alone, in step 3: the processes agree at the next boundary and both stop after
        # step 4, in one checkpoint with both processes' state; its resume is the straight run, bit for bit
        data_parallel(base_dir, tmp_path / "stopped", batch_size=2, save_every=10, signal=(1, 3, signal.SIGTERM))
        said = [json.loads((tmp_path / "stopped" / f"process-{r}.json").read_text()) for r in (0, 1)]
        assert [(p["checkpoint"], p["signal"]) for p in said] == [(str(tmp_path / "stopped" / "checkpoint-4"), 15)] * 2
        assert [d for d in os.listdir(tmp_path / "stopped") if d.startswith("checkpoint")] == ["checkpoint-4"]
        data_parallel(base_dir, tmp_path / "stopped", batch_size=2, save_every=10, resume="latest")
        c = adapter(tmp_path / "stopped" / "adapter")
        assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ml.ResumeMismatch, match="processes 2 -> 1"):  # resume needs the same N
        single(base_dir, tmp_path / "one", batch_size=2, resume=str(tmp_path / "straight" / "checkpoint-4"),
               fast=not sharded)
    if sharded:  # and the same sharding: the optimizer state's layout differs
        with pytest.raises(mp.ProcessRaisedException, match="ResumeMismatch.*fsdp True -> False"):
            data_parallel(base_dir, tmp_path / "straight", batch_size=2, fast=False, resume="latest")


def test_packed_steps_train_the_same_sharded_or_replicated(base_dir, tmp_path):
    """Two processes, each taking one pack of 2 x 128 tokens of every global micro-batch (pack=True), through
    transformers' layers with the packs' segment mask: sharded (fsdp) they train what they train replicated,
    on the same packs. Losses and adapters within 1e-5 (fp32; only the order of additions differs)."""
    kw = dict(pack=True, batch_size=2, fast=False)
    data_parallel(base_dir, tmp_path / "replicated", **kw)
    data_parallel(base_dir, tmp_path / "sharded", fsdp=True, **kw)
    a, b = adapter(tmp_path / "replicated" / "adapter"), adapter(tmp_path / "sharded" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl") if '"loss"' in line]
              for run in ("replicated", "sharded")]
    assert len(losses[0]) == 5 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_example_under_torchrun_equals_one_process_and_resumes_a_sigterm_bit_exactly(tmp_path):
    """The example under torchrun trains what one process does at twice the batch. A SIGTERM to torchrun (as a
    scheduler sends it) reaches both processes: they stop at the same step, save one checkpoint with both
    processes' state, and the resumed run equals the run that nothing stopped, bit for bit."""
    flags = ["--preset", "tiny", "--pretrain-steps", "20", "--max-steps", "20", "--lora-dropout", "0",
             "--eval-size", "0", "--log-every", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]

    def launch(name, *cmd):
        return subprocess.Popen([*cmd, "--output-dir", str(tmp_path / name)], cwd=ROOT, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    runs = {"ddp": [*torchrun, str(_port()), "examples/train_guanaco.py", *flags, "--batch-size", "4"],
            "one": [sys.executable, "examples/train_guanaco.py", *flags, "--batch-size", "8"]}
    for name, cmd in runs.items():
        out, _ = launch(name, *cmd).communicate(timeout=600)
        assert "step 20/20" in out, out[-3000:]
    a, b = adapter(tmp_path / "one" / "adapter"), adapter(tmp_path / "ddp" / "adapter")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-5 * a[k].norm(), k

    stopped = launch("stopped", *runs["ddp"])
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    while stopped.poll() is None and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=600)
    said = re.findall(r"stopped by SIGTERM after step (\d+): saved (\S+); resume it", out)
    assert len(said) == 2 and said[0] == said[1], out[-3000:]  # both processes, at the same step
    step, path = int(said[0][0]), said[0][1]
    assert 1 <= step < 20 and path == str(tmp_path / "stopped" / f"checkpoint-{step}")
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    assert state["step"] == step and len(state["rng_ranks"]) == 2  # every process's RNG state
    command = out.split("resume with:  ")[1].splitlines()[0].split()
    assert command[:3] == ["torchrun", "--nproc-per-node", "2"] and command[-2:] == ["--resume", "latest"]
    out, _ = launch("stopped", *runs["ddp"], "--resume", "latest").communicate(timeout=600)
    assert f"step {step + 1}/20" in out and "step 20/20" in out, out[-3000:]
    a, b = adapter(tmp_path / "ddp" / "adapter"), adapter(tmp_path / "stopped" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_process_group_of_one_trains_what_no_group_does(base_dir, tmp_path):
    # in a process group the LoRA grads are views of one flat buffer, kept through the run and all-reduced once
    # a step; with one process that sum is the identity, so the path must give the plain run's adapter bit for
    # bit, gradient accumulation included
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_port()}")
    try:
        single(base_dir, tmp_path / "group", batch_size=2, grad_accum=2)
    finally:
        dist.destroy_process_group()
    single(base_dir, tmp_path / "plain", batch_size=2, grad_accum=2)
    a, b = adapter(tmp_path / "plain" / "adapter"), adapter(tmp_path / "group" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
