#!/usr/bin/env python
"""Two row-length thresholds of the fast layers' attention, each timed in one process with the fast layers'
step (`step.worker`, the same step as step.py) at cases below and above it, so that only that choice differs:

  long  LONG_ATTENTION, from which cuDNN attention comes before flash;
  keep  KEEP_ATTENTION, from which an offloaded attention unit keeps attention's output for its recompute.

`--study kernels` times attention alone instead: causal, bf16, 32 heads of 128 at --seq tokens, forward and
forward + backward, through each of torch's SDPA backends and compiled FlexAttention.

    python benchmarks/attention.py --study keep --out benchmarks/results/h100-keep-attention.json
    python benchmarks/attention.py --study kernels --seq 32768
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step  # noqa: E402

NEVER = 10**9
STUDIES = {  # per study, the runs: (impl, case, the threshold's value)
    "long": [("minilora+fast+offload", "qv-r64-2x2048", 4096), ("minilora+fast+offload", "qv-r64-2x2048", 2048),
             ("minilora+fast", "qv-r64-2x2048", 2048), ("minilora+fast+offload", "qv-r64-4x512", 512),
             ("minilora+fast+offload", "qv-r64-4x512", 4096)],
    "keep": [("minilora+fast+offload", case, keep) for case in ("qv-r64-2x2048", "qv-r64-1x4096", "qv-r64-1x8192",
                                                               "qv-r64-1x16384", "qv-r64-1x32768")
             for keep in (NEVER, 1)],
}
THRESHOLD = {"long": "LONG_ATTENTION", "keep": "KEEP_ATTENTION"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=[*STUDIES, "kernels"], default="long")
    ap.add_argument("--seq", type=int, default=32768, help="tokens a row, for --study kernels")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    import minilora.kernels.attention as attention

    if args.study == "kernels":
        rows = [kernel_rates(args.seq, backend) for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION",
                                                                "EFFICIENT_ATTENTION", "flex")]
        if args.out:
            step._write(args.out, {"card": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__},
                                   "command": " ".join(sys.argv), "rows": rows})
        return
    model_dir = os.path.join(tempfile.gettempdir(), "minilora-bench-llama2-7b")
    env = step.prepare({"shape": "llama2-7b", "model_dir": model_dir, "device": None})
    rows = []
    name = THRESHOLD[args.study]
    for impl, case, threshold in STUDIES[args.study]:
        setattr(attention, name, threshold)
        spec = dict(step.parse_case(case), impl=impl, case=case, model_dir=model_dir, device="cuda", seed=0,
                    steps=args.steps, warmup=2)
        r = step.worker(spec)
        rows.append(dict(impl=impl, case=case, **{name.lower(): threshold}, step_s=r["step_s"],
                         tokens_per_s=r["tokens_per_s"], peak_alloc_gib=r["peak_alloc_gib"], step_times=r["step_times"]))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        step._write(args.out, {"card": env["card"], "driver": env["driver"], "versions": env["versions"],
                               "command": " ".join(sys.argv), "rows": rows})


def kernel_rates(T: int, backend: str, heads: int = 32, head_dim: int = 128, repeats: int = 5) -> dict:
    """Milliseconds and TFLOP/s of one causal attention's forward, and of its forward + backward, at 1 x T tokens:
    `backend` is an SDPBackend's name, or "flex" for FlexAttention under torch.compile."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.randn(1, heads, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if backend == "flex":
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T)
        run = functools.partial(torch.compile(flex_attention), block_mask=mask)
    else:
        def run(q, k, v):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grad = torch.randn_like(q)

    def timed(fn) -> float:
        fn()  # the first call compiles or plans
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    forward = 2 * heads * T * T * head_dim  # two GEMMs over the causal half: 2 x (2 T^2 d / 2) a head
    row = {"backend": backend, "seq": T}
    try:
        with torch.no_grad():
            row["forward_ms"] = timed(lambda: run(q, k, v))
        row["forward_backward_ms"] = timed(lambda: torch.autograd.grad(run(q, k, v), (q, k, v), grad))
    except Exception as e:  # a backend that does not take this shape or card
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    else:
        backward_ms = row["forward_backward_ms"] - row["forward_ms"]
        row.update(forward_tflops=forward / row["forward_ms"] / 1e9, backward_ms=backward_ms,
                   backward_tflops=2.5 * forward / backward_ms / 1e9)  # five GEMMs (q k^T again, dP, dv, dq, dk)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
