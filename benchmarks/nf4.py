#!/usr/bin/env python
"""NF4 dequantization of one 7B-sized weight (11008 x 4096, double quant): bitsandbytes against minilora's
Triton kernel (minilora/kernels/nf4.py). GPU only.

    python benchmarks/nf4.py

Prints the GPU time per call (bandwidth counts 0.5 byte read + 2 bytes written per weight) and the host time
per call (200 launches without a sync, so the GPU queue never fills).
"""

import time

import bitsandbytes as bnb
import torch

from minilora.kernels import nf4


def gpu_us(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def host_us(fn, n=200):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return elapsed


def main():
    shape = (11008, 4096)
    w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    q = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cuda")
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    impls = {"bitsandbytes": lambda: bnb.functional.dequantize_4bit(q.data, q.quant_state, out=out),
             "minilora": lambda: nf4.dequantize_nf4(q, out)}
    gb = shape[0] * shape[1] * 2.5 / 1e9
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    for name, fn in impls.items():
        t = gpu_us(fn)
        print(f"{name:13} {t:6.0f} us ({gb / t * 1e3:.2f} TB/s), host {host_us(fn):4.0f} us per call")


if __name__ == "__main__":
    main()
