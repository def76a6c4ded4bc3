"""Where train()'s planned step spends its GPU time, at a fixed shape (GPU only).

    python benchmarks/profile_step.py --batch 1 --seq 32768 --budget 7.5

The step is step.py's `load_minilora_plan`: the memory plan train() chooses for the budget, the batch copied
from the host, forward and backward (replayed CUDA graphs where the plan allows), clipping, fused AdamW and the
schedule. r64 LoRA on q and v, dropout 0, random tokens, all supervised, on the Llama-2-7B shape with random
weights (built once, as step.py builds it). After the warm-up it times --steps steps back to back, then runs
torch.profiler over two more and prints the kernels and the ops that launched them by self GPU time a step, and
each stream's busy time a step with its largest gaps.
"""

import argparse
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from step import load_minilora_plan, prepare

MODEL_DIR = os.path.join(tempfile.gettempdir(), "minilora-bench-llama2-7b")  # as step.py and attention.py


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--budget", type=float, default=4.6, help="memory_budget_gib of the plan")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=30, help="kernels and ops listed")
    args = p.parse_args()
    env = prepare({"shape": "llama2-7b", "model_dir": MODEL_DIR, "device": None})
    print(f"{env['card']}, driver {env['driver']}; {env['versions']}", flush=True)
    spec = dict(model_dir=MODEL_DIR, device="cuda", seed=0, targets=("q_proj", "v_proj"), r=64, alpha=16.0,
                dropout=0.0, batch=args.batch, seq=args.seq, impl=f"minilora@{args.budget}")
    model, step = load_minilora_plan(spec)
    model.train()
    print(spec["memory_plan"], flush=True)
    tokens = args.batch * args.seq
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.cuda()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step(ids)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.steps
    print(f"{args.batch} x {args.seq} at {args.budget} GiB: {wall * 1e3:.1f} ms a step, {tokens / wall:,.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step(ids)
        torch.cuda.synchronize()
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"{e.self_device_time_total / 2e3:8.2f} ms/step {e.count // 2:6d}/step  {e.key[:200]}")
    streams = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            streams.setdefault(e.device_resource_id, []).append(e)
    for s, es in streams.items():
        es.sort(key=lambda e: e.time_range.start)
        busy = sum(e.time_range.end - e.time_range.start for e in es) / 2e3
        gaps = sorted(((y.time_range.start - x.time_range.end) / 1e3, x.name[:60], y.name[:60])
                      for x, y in zip(es, es[1:]))[-8:]
        print(f"stream {s}: {len(es) // 2} kernels a step, {busy:.1f} ms busy a step (wall {wall * 1e3:.1f}); "
              "largest gaps (ms):")
        for gap, before, after in gaps:
            print(f"   {gap:8.2f}  after {before}  before {after}")


if __name__ == "__main__":
    main()
