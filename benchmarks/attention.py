#!/usr/bin/env python
"""From which row length cuDNN attention should come before flash in the fast layers: one process times the
fast layers' step (`step.worker`, the same step as step.py) at a case with LONG_ATTENTION set below and above
the case's length, so that only the attention backend differs.

    python benchmarks/attention.py --out benchmarks/results/h100-attention.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step  # noqa: E402

RUNS = [("minilora+fast+offload", "qv-r64-2x2048", 4096), ("minilora+fast+offload", "qv-r64-2x2048", 2048),
        ("minilora+fast", "qv-r64-2x2048", 2048), ("minilora+fast+offload", "qv-r64-4x512", 512),
        ("minilora+fast+offload", "qv-r64-4x512", 4096)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    import minilora.kernels.layer as layer

    model_dir = os.path.join(tempfile.gettempdir(), "minilora-bench-llama2-7b")
    env = step.prepare({"shape": "llama2-7b", "model_dir": model_dir, "device": None})
    rows = []
    for impl, case, long_attention in RUNS:
        layer.LONG_ATTENTION = long_attention  # cuDNN first from this many tokens a row
        spec = dict(step.parse_case(case), impl=impl, case=case, model_dir=model_dir, device="cuda", seed=0,
                    steps=args.steps, warmup=2)
        r = step.worker(spec)
        rows.append(dict(impl=impl, case=case, long_attention=long_attention, step_s=r["step_s"],
                         tokens_per_s=r["tokens_per_s"], peak_alloc_gib=r["peak_alloc_gib"], step_times=r["step_times"]))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        step._write(args.out, {"card": env["card"], "driver": env["driver"], "versions": env["versions"],
                               "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
