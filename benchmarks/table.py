#!/usr/bin/env python
"""Print the README's Markdown table from a benchmarks/step.py result file.

    python benchmarks/table.py benchmarks/results/FILE.json [MORE.json ...] [--impls minilora,minilora+compile]

One row per case and minilora implementation, beside PEFT's numbers from the same run.
Peak memory is max_memory_allocated / max_memory_reserved in GiB; "predicted" is minilora.plan_memory.
Several files (a run split over device calls) are joined; the header line comes from the first.
"""

from __future__ import annotations

import argparse
import json


def _f(x, spec="{:.2f}"):
    return "–" if x is None else spec.format(x)


def markdown_table(result: dict, impls=None) -> str:
    cases = [c for c in result["cases"] if c.get("status") == "ok"]
    peft = {c["case"]: c for c in cases if c["impl"] == "peft"}
    v = result.get("versions", {})
    lines = [f"{result.get('card')} (driver {result.get('driver')}), {result.get('date', '')[:10]}; torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}; "
             f"median of {result.get('steps')} steps after {result.get('warmup')} warm-up; all tokens supervised.",
             "",
             "| LoRA | batch × seq | impl | tok/s | PEFT tok/s | × PEFT | peak GiB (alloc / reserved) "
             "| PEFT peak GiB | predicted GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        if c["impl"] == "peft" or (impls and c["impl"] not in impls):
            continue
        p = peft.get(c["case"], {})
        ratio = c["tokens_per_s"] / p["tokens_per_s"] if p.get("tokens_per_s") else None
        lines.append(f"| {c['lora']} | {c['batch']} × {c['seq']} | {c['impl']} | {_f(c['tokens_per_s'], '{:,.0f}')} "
                     f"| {_f(p.get('tokens_per_s'), '{:,.0f}')} | {_f(ratio)} "
                     f"| {_f(c.get('peak_alloc_gib'))} / {_f(c.get('peak_reserved_gib'))} "
                     f"| {_f(p.get('peak_alloc_gib'))} / {_f(p.get('peak_reserved_gib'))} | {_f(c.get('predicted_gib'))} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON files written by benchmarks/step.py --out")
    ap.add_argument("--impls", default=None, help="comma-separated minilora impls to show (default: all)")
    args = ap.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    joined = dict(results[0], cases=[c for r in results for c in r["cases"]])
    print(markdown_table(joined, args.impls.split(",") if args.impls else None))


if __name__ == "__main__":
    main()
