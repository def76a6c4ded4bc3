#!/usr/bin/env python
"""Two row-length thresholds of the fast layers' attention, each timed in one process with the fast layers'
step (`step.worker`, the same step as step.py) at cases below and above it, so that only that choice differs:

  long  LONG_ATTENTION, from which cuDNN attention comes before flash;
  keep  KEEP_ATTENTION, from which an offloaded attention unit keeps attention's output for its recompute.

    python benchmarks/attention.py --study keep --out benchmarks/results/h100-keep-attention.json
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
    ap.add_argument("--study", choices=list(STUDIES), default="long")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    import minilora.kernels.attention as attention

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


if __name__ == "__main__":
    main()
