#!/usr/bin/env python
"""One training step, timed and measured: minilora (plain and with each speed option) against PEFT, same run.

    python benchmarks/step.py --shape llama2-7b --cases standard --out benchmarks/results/h100.json
    python benchmarks/step.py --shape tiny --cases qv-r8-2x64 --steps 2 --warmup 1      # a CPU smoke run

A step is forward (bf16 autocast), backward, AdamW (lr 2e-4) and zero_grad(set_to_none=True) on random tokens
that are all supervised (labels = input_ids), the same tokens for every implementation. Each (case, impl) runs
in its own subprocess, so no implementation can patch, warm up or fragment memory for another. The model
(random weights of the chosen shape) is written once to a temporary directory, reused by every case and, if
it is still there, by the next invocation. stdout: one JSON line per case as it finishes, then a table; the
workers' own output and progress go to stderr.

Cases are named `{targets}-r{r}[-a{alpha}][-d{dropout}]-{batch}x{seq}`, targets qv | qkvo | all (the seven
projections), e.g. qv-r64-4x512; alpha defaults to 16. `--cases standard` is STANDARD below.
Impls: `peft`, `minilora` and `minilora+opt[+opt...]`, where each opt is a keyword of
`minilora.prepare_for_training` switched on (fast, offload, ...). A variant whose keyword the
installed `prepare_for_training` does not accept is reported as unavailable. `unsloth` (not in the default
list) loads with Unsloth's FastLanguageModel and its offloaded checkpointing; it needs Unsloth on the path
(../shared/device/stage-peers, .peer-site first on PYTHONPATH) and is reported as unavailable without it:

    python benchmarks/step.py --cases qv-r64-4x512,qv-r64-2x2048 --impls minilora+fast,unsloth

`minilora@GiB` (e.g. minilora@4.6) is train()'s own step with the memory plan train() chooses for a budget of
that many GiB at the case's shape: the batch copied from the host as train() copies it, forward and backward
replayed as CUDA graphs where train() replays them, clipping, the optimizer and the schedule. `--optimizer`
is its TrainConfig.optimizer (fused torch AdamW by default; adamw_8bit, paged_adamw_8bit, paged_adamw from
bitsandbytes); the other impls train with torch's AdamW and refuse any other:

    python benchmarks/step.py --cases qv-r64-2x2048:minilora@4.6/unsloth,qv-r64-4x512:minilora@4.4/unsloth
    python benchmarks/step.py --cases qv-r64-2x2048:minilora@8 --optimizer paged_adamw_8bit

A minilora row's predicted_gib is plan_memory's peak for the options it ran (and its optimizer), beside the measured
peak_alloc_gib; plan_paged_gib is the paged optimizer states that torch's counters never see, and device_used_gib
the card's used memory after the steps (CUDA context, torch's reserved pool, managed memory on the card).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the ids of write_tokenizer's tokenizer
SHAPES = {  # a config's model_type and fields; "tiny" is minilora.tiny.tiny_config
    "llama2-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, **TOKENS),
    # Llama 3.1 8B: grouped-query attention, a 128k vocabulary, RoPE scaled as rope_type llama3
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192), **TOKENS),
    # Qwen2.5 7B: q, k, v biases, 4 key-value heads, a 152k vocabulary
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0), use_sliding_window=False,
                       **TOKENS),
    # Llama 2 70B: 80 layers, 8 key-value heads. Never written in bf16 (140 GB): its NF4 linears are made on the
    # device one at a time from random bf16 weights (random_nf4_model), 35 GB in all
    "llama2-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, **TOKENS),
    "tiny": dict(max_position_embeddings=4096),
}
NF4_ONLY = {"llama2-70b"}  # shapes built as random NF4 on the device at load time, not saved: minilora's impls only
TARGETS = {"qv": ("q_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
STANDARD = ["qv-r64-4x512", "qv-r64-2x2048", "all-r16-2x2048", "qv-r64-d0.1-4x512"]  # the last: the seed config
VARIANTS = ["minilora+offload", "minilora+fast", "minilora+fast+offload"]
CASE_RE = re.compile(r"^(?P<t>[a-z]+)-r(?P<r>\d+)(?:-a(?P<a>[\d.]+))?(?:-d(?P<d>[\d.]+))?-(?P<b>\d+)x(?P<s>\d+)$")
RESULT = "@@result "  # a worker's result line; everything else it prints is passed on to stderr
PEFT_RECIPE = ("AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, "
               "bf16 compute), dtype=bf16, sdpa) -> peft.prepare_model_for_kbit_training(model, "
               "use_gradient_checkpointing=True, gradient_checkpointing_kwargs={'use_reentrant': False}) "
               "(the standard QLoRA recipe: it also casts embeddings, norms and lm_head to fp32) -> "
               "get_peft_model(LoraConfig(r, alpha, dropout, targets, bias='none', task_type='CAUSAL_LM')); "
               "loss = model(input_ids, labels=input_ids).loss (HF loss, fp32 logits)")
UNSLOTH_RECIPE = ("import unsloth first -> FastLanguageModel.from_pretrained(dir, max_seq_length=seq, dtype=bf16, "
                  "load_in_4bit=True) -> FastLanguageModel.get_peft_model(r, alpha, dropout, targets, "
                  "use_gradient_checkpointing='unsloth') -> for_training; "
                  "loss = model(input_ids, labels=input_ids).loss (Unsloth's own loss)")
MINILORA_RECIPE = ("ml.load_model(dir, quant='nf4', double_quant=True, compute_dtype=bf16) -> ml.add_lora -> "
                   "ml.prepare_for_training(model, gradient_checkpointing=True, **variant) ; "
                   "loss_sum, n = minilora.loss.causal_lm_loss(model, batch); loss = loss_sum / n")
LOOP = ("model.train(); per step: bf16 autocast forward; loss.backward(); torch.optim.AdamW(trainable, lr=2e-4)"
        ".step(); zero_grad(set_to_none=True). Step time: median over timed steps after warm-up, measured with "
        "synchronize + perf_counter. Peaks: max_memory_allocated/reserved since reset_peak_memory_stats just "
        "before the first (warm-up) step; *_timed: since a reset after warm-up")
GiB = 2**30


def parse_case(name: str, scale: float = 1.0) -> dict:
    m = CASE_RE.match(name)
    if not m or m["t"] not in TARGETS:
        raise SystemExit(f"bad case {name!r}: use {{{'|'.join(TARGETS)}}}-r<r>[-a<alpha>][-d<dropout>]-<B>x<T>, "
                         f"e.g. qv-r64-4x512, or 'standard'")
    seq = max(2, round(int(m["s"]) * scale))
    return dict(name=name, targets=TARGETS[m["t"]], r=int(m["r"]), alpha=float(m["a"] or 16),
                dropout=float(m["d"] or 0), batch=int(m["b"]), seq=seq,
                lora=f"r{m['r']} {m['t']}" + (f" d{m['d']}" if m["d"] else ""))


def variant_kwargs(impl: str) -> dict:
    """'minilora+fast+offload' -> {'fast': True, 'offload': True}; 'minilora@4.6' -> {} (the plan decides)."""
    return {} if "@" in impl else {opt: True for opt in impl.split("+")[1:]}


def impl_budget(impl: str) -> float | None:
    """The memory budget of a `minilora@GiB` impl (train()'s own step under its plan for that budget), or None."""
    m = re.fullmatch(r"minilora@(\d+(?:\.\d+)?)", impl)
    return float(m[1]) if m else None


# ----------------------------------------------------------------------------------------------- subprocesses


def model_config(shape: str):
    from transformers import AutoConfig

    if shape == "tiny":
        from minilora.tiny import tiny_config

        return tiny_config(**SHAPES["tiny"])
    fields = dict(SHAPES[shape])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def write_tokenizer(out: str):
    """A small byte-level tokenizer (tokenizer.json) beside the weights: ml.load_model loads one, and the GPU
    machine may lack sentencepiece. The benchmark's token ids are random, so its vocabulary does not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.ByteFallback()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)


def prepare(spec: dict) -> dict:
    """Write the random-weight model once (bf16, built on the device) and report the environment."""
    import inspect
    import platform

    import torch
    import transformers

    out = spec["model_dir"]
    device = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    config = model_config(spec["shape"])
    marker, want = os.path.join(out, "bench-model.json"), {"shape": spec["shape"], "config": config.to_dict()}
    build_s = None
    try:
        reuse = json.load(open(marker)) == json.loads(json.dumps(want))
    except (OSError, ValueError):
        reuse = False
    if not reuse and spec["shape"] in NF4_ONLY:  # the config alone: each load makes its weights
        os.makedirs(out, exist_ok=True)
        config.save_pretrained(out)
        write_tokenizer(out)
        json.dump(want, open(marker, "w"))
    elif not reuse:
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: 13.5 GB for 7B instead of 27 GB
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
        torch.set_default_dtype(prev)
        model.save_pretrained(out)
        del model
        write_tokenizer(out)
        json.dump(want, open(marker, "w"))
        build_s = time.perf_counter() - t0
        print(f"built {spec['shape']} with random weights in {out} in {build_s:.1f}s", file=sys.stderr, flush=True)
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__}
    for mod in ("peft", "bitsandbytes"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, don't fail: the impls that need it will say why
            versions[mod] = f"unavailable: {e}"
    for dist in ("unsloth", "unsloth_zoo", "trl", "datasets"):  # read, not imported: importing Unsloth patches
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        from minilora.model import prepare_for_training
        from minilora.plan import PlanOptions

        # its keywords, and PlanOptions' fields, which it takes by name too (gradient_checkpointing among them)
        kwargs = sorted({*inspect.signature(prepare_for_training).parameters, "gradient_checkpointing",
                         *PlanOptions.__dataclass_fields__} - {"model", "options", "fields"})
    except Exception as e:  # noqa: BLE001
        kwargs, versions["minilora"] = [], f"unavailable: {e}"
    card = driver = None
    if device.startswith("cuda"):
        card = torch.cuda.get_device_name()
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            try:
                import pynvml

                pynvml.nvmlInit()
                driver = pynvml.nvmlSystemGetDriverVersion()
            except Exception:  # noqa: BLE001
                driver = None
    else:
        card = platform.processor() or platform.machine()
    return {"device": device, "versions": versions, "prepare_kwargs": kwargs, "card": card, "driver": driver, "build_s": build_s,
            "reused_model": reuse, "config": config.to_dict()}


def load_peft(spec):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": spec["device"]}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                                             target_modules=list(spec["targets"]), bias="none", task_type="CAUSAL_LM"))

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def import_unsloth() -> str | None:
    """Import Unsloth, which patches transformers, PEFT and TRL as it loads, so it must come before transformers
    does: None, or the status that says why it cannot (not staged, no GPU, ...)."""
    try:
        importlib.import_module("unsloth")
    except Exception as e:  # noqa: BLE001 - the row says why, the other impls run on
        why = (str(e).splitlines() or [""])[0]
        return (f"unavailable: cannot import unsloth ({type(e).__name__}: {why}); stage it with "
                "../shared/device/stage-peers and put .peer-site first on PYTHONPATH")
    return None


def load_unsloth(spec):
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(spec["model_dir"], max_seq_length=spec["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                                             target_modules=list(spec["targets"]), use_gradient_checkpointing="unsloth",
                                             random_state=spec["seed"])
    FastLanguageModel.for_training(model)

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def load_minilora(spec):
    import torch

    import minilora as ml
    from minilora.loss import causal_lm_loss

    model, _ = ml.load_model(spec["model_dir"], quant="nf4", double_quant=True, compute_dtype=torch.bfloat16,
                             device=spec["device"])
    torch.manual_seed(spec["seed"])
    ml.add_lora(model, targets=spec["targets"], r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"])
    opts = variant_kwargs(spec["impl"])
    ml.prepare_for_training(model, gradient_checkpointing=True, **opts)
    spec["loss_chunk"] = loss_chunk(model.config, spec, opts)

    def loss_fn(ids):  # from host tensors, as train() does: to_device finds the supervised rows on the host
        ids = ids.cpu()
        loss_sum, n = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, spec["loss_chunk"])
        return loss_sum / n

    return model, loss_fn


def random_nf4_model(model_dir: str, device: str):
    """The causal LM of model_dir's config with random weights, as host_load.load_streamed gives a checkpoint: each
    decoder linear made in bf16 on the device, quantized there to NF4 (double quant) and its codes and scales parked
    in pinned host memory before the next is made; the rest in bf16 on the device (norms 1). The plan then streams
    them, or prepare_for_training copies them to the device. No bf16 copy of the whole model exists anywhere."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from minilora.host_load import parked_4bit

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                w = torch.empty(m.out_features, m.in_features, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
                parent, attr = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent), attr, parked_4bit(m, w, "nf4", True, torch.bfloat16,
                                                                       torch.device(device)))
    for m in model.modules():  # embeddings, lm_head and norms
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, dtype=torch.bfloat16, device=device)
                setattr(m, name, torch.nn.Parameter(t.normal_(0, 0.02) if p.dim() > 1 else t.fill_(1.0),
                                                    requires_grad=False))
    with torch.device(device):  # its inverse frequencies, computed there
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.name_or_path = model_dir
    return model


def load_minilora_plan(spec):
    """train()'s step at a fixed shape: the memory plan train() chooses for the impl's budget (plan_choice.plan_run), the
    decoder prepared as it says, and each step as train() takes it: the batch copied from the host
    (FastPath.move), forward and backward through minilora.step.Stepper (replayed CUDA graphs where train()
    would use them), then minilora.optimizer.optimizer_step's clipping, the spec's optimizer (make_optimizer) and
    schedule. Returns (model, step): step(ids) takes one optimizer step and returns its mean loss."""
    import torch

    import minilora as ml
    from minilora.fast_path import fast_path
    from minilora.plan_choice import plan_run
    from minilora.model import prepare_for_training
    from minilora.optimizer import make_optimizer, optimizer_step
    from minilora.step import Stepper

    if spec["shape"] in NF4_ONLY:
        model = random_nf4_model(spec["model_dir"], spec["device"])
    else:
        model, _ = ml.load_model(spec["model_dir"], quant="nf4", double_quant=True, compute_dtype=torch.bfloat16,
                                 device=spec["device"])
    torch.manual_seed(spec["seed"])
    ml.add_lora(model, targets=spec["targets"], r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"])
    cfg = ml.TrainConfig(batch_size=spec["batch"], max_len=spec["seq"], lora_r=spec["r"], lora_alpha=spec["alpha"],
                         lora_dropout=spec["dropout"], targets=tuple(spec["targets"]), precision="bf16",
                         memory_budget_gib=impl_budget(spec["impl"]), max_steps=10**6, schedule="constant",
                         warmup_ratio=0.0, optimizer=spec["optimizer"])  # lr 2e-4 from the first step, as the others
    options, line, shape_plan = plan_run(model, cfg)
    prepare_for_training(model, options)
    fast = fast_path(model, cfg, options, shape_plan)  # on a GPU: never None
    stepper = Stepper(model, options.loss_chunk, cfg.precision, torch.amp.GradScaler(enabled=False), fast)
    opt, sched = make_optimizer(model, cfg, cfg.max_steps)
    spec.update(loss_chunk=options.loss_chunk, memory_plan=line + f"; CUDA graphs {'on' if fast.graphs else 'off'}",
                plan_options=dataclasses.asdict(options))

    def step(ids):
        batch = fast.move({"input_ids": ids.cpu(), "labels": ids.cpu()})
        loss_sum, n, _ = optimizer_step(stepper, [(batch, batch["n_tokens"])], opt, sched, cfg.max_grad_norm)
        return loss_sum / n

    return model, step


def loss_chunk(config, spec, opts) -> int:
    """The loss chunk train()'s memory plan would take for fast layers with these options: the largest that
    leaves the step's predicted peak where the smallest chunk has it. transformers' layers: the default 4096."""
    from minilora.plan import LOSS_CHUNKS, plan_memory
    from minilora.plan_choice import choose_plan

    if not opts.get("fast"):
        return LOSS_CHUNKS[0]
    fixed = dict(gradient_checkpointing=config.num_hidden_layers, cached_layers=0, keep_weights=False,
                 offload=opts.get("offload", False))
    kw = dict(lora_r=spec["r"], lora_targets=spec["targets"], lora_dropout=spec["dropout"])
    floor = plan_memory(config, spec["batch"], spec["seq"], fast=True, loss_chunk=LOSS_CHUNKS[-1], **fixed, **kw)
    return choose_plan(config, spec["batch"], spec["seq"], floor["total"], fixed=fixed, **kw)["options"].loss_chunk


def train_step(model, loss_fn, ids, opt, device):
    import torch

    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_fn(ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def peak_tensors(step, top: int) -> dict:
    """Run `step` once under torch.cuda.memory._record_memory_history and return the moment allocated memory
    peaked: its total and the `top` largest tensors then alive, each with the innermost frames of
    minilora (or else of any Python file) that allocated it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=500_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live = {}  # address -> (bytes, frames) of tensors allocated during the step
    for seg in snap["segments"]:  # blocks already alive when recording began (weights, optimizer state)
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                live[blk.get("address", seg["address"])] = (blk["size"], "before the step")
    base = sum(size for size, _ in live.values())
    events = [e for trace in snap["device_traces"] for e in trace]
    now, best, best_live = 0, -1, {}
    for e in events:
        if e["action"] == "alloc":
            frames = [f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in e.get("frames", [])
                      if f["filename"].endswith(".py")]
            mine = [f for f in frames if "minilora" in f or any(k in f for k in ("layer.py", "lora4bit", "loss.py",
                                                                               "offload.py", "swiglu.py"))]
            live[e["addr"]] = (e["size"], " < ".join((mine or frames)[:3]))
            now += e["size"]
            if now > best:
                best, best_live = now, dict(live)
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            if e["action"] == "free_requested":
                now -= live.pop(e["addr"])[0]
    rows = sorted(best_live.values(), key=lambda t: -t[0])[:top]
    return {"peak_gib": (base + best) / GiB if best_live else None,
            "tensors": [{"mib": round(size / 2**20, 1), "where": where} for size, where in rows]}


def worker(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if spec["impl"] == "unsloth":  # imports are not part of the load time; Unsloth's comes before transformers
        why = import_unsloth()
        if why:
            return {"status": why}
    elif spec["impl"] == "peft":
        importlib.import_module("peft")
    else:
        importlib.import_module("minilora")
    importlib.import_module("transformers")

    t0 = time.perf_counter()
    planned = impl_budget(spec["impl"]) is not None
    loader = load_minilora_plan if planned else {"peft": load_peft, "unsloth": load_unsloth}.get(spec["impl"],
                                                                                                  load_minilora)
    model, loss_fn = loader(spec)  # for a planned impl, loss_fn is the whole step
    model.train()  # HF checkpointing and LoRA dropout act only in training mode
    sync()
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = None if planned else torch.optim.AdamW(trainable, lr=2e-4)
    B, T, V = spec["batch"], spec["seq"], model.config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(spec["seed"])).to(device)

    def one_step():
        return loss_fn(ids) if planned else train_step(model, loss_fn, ids, opt, device)
    res = {"load_s": load_s, "trainable_params": sum(p.numel() for p in trainable),
           "ids_checksum": int(ids.sum()), "alloc_after_load_gib": torch.cuda.memory_allocated() / GiB if cuda else None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, warm_peaks = [], [], (0, 0)
    n = spec["warmup"] + spec["steps"]
    for i in range(n):
        sync()
        t = time.perf_counter()
        loss = one_step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"  {spec['impl']} {spec['name']} step {i + 1}/{n}{' (warm-up)' if i < spec['warmup'] else ''}: "
              f"{times[-1]:.3f}s loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if cuda and i == spec["warmup"] - 1:
            warm_peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
    if cuda and spec.get("peak_tensors"):
        res["peak_tensors"] = peak_tensors(one_step, spec["peak_tensors"])
    timed = times[spec["warmup"]:]
    step_s = statistics.median(timed)
    res.update(step_s=step_s, tokens_per_s=B * T / step_s, step_times=timed, warmup_times=times[:spec["warmup"]],
               loss_first=losses[0], loss_last=losses[-1], finite=all(x == x and abs(x) != float("inf") for x in losses))
    if cuda:
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        free, card = torch.cuda.mem_get_info()
        res.update(peak_alloc_gib=max(alloc, warm_peaks[0]) / GiB, peak_reserved_gib=max(reserved, warm_peaks[1]) / GiB,
                   peak_alloc_timed_gib=alloc / GiB, peak_reserved_timed_gib=reserved / GiB,
                   alloc_steady_gib=torch.cuda.memory_allocated() / GiB, device_used_gib=(card - free) / GiB,
                   device_name=torch.cuda.get_device_name())
    else:
        res.update(peak_alloc_gib=None, peak_reserved_gib=None)
    if spec["impl"].startswith("minilora"):  # the planner models minilora's step, not the peers' own
        from minilora.plan import PlanOptions, plan_memory

        # a planned impl: the options train()'s plan chose (the prediction for them, with the optimizer the step ran)
        opts = variant_kwargs(spec["impl"])
        options = PlanOptions(**spec["plan_options"]) if planned else PlanOptions(
            fast=opts.get("fast", False), offload=opts.get("offload", False), loss_chunk=spec["loss_chunk"])
        plan = plan_memory(model.config, B, T, options, lora_r=spec["r"], lora_targets=spec["targets"],
                           lora_dropout=spec["dropout"], optimizer=spec["optimizer"])
        if planned:
            res.update(memory_plan=spec["memory_plan"], plan_options=spec["plan_options"])
        res.update(loss_chunk=spec["loss_chunk"], predicted_gib=plan["total"] / GiB, plan_phase=plan["phase"],
                   plan_phases_gib={k: round(v / GiB, 4) for k, v in plan["phases"].items()},
                   plan_gib={k: round(v / GiB, 4) for k, v in plan["breakdown"].items()},
                   plan_paged_gib=plan["paged_optimizer"] / GiB)
    return res


# ---------------------------------------------------------------------------------------------------- parent


def run_child(mode: str, spec: dict, timeout: float | None, script: str = __file__,
              nproc: int = 1) -> tuple[dict | None, str, float]:
    """Run `script` (this one by default) as `--_{mode} SPEC` in a fresh process (own session, so a timeout kills
    its compile workers too); pass its output on to stderr; return (result, error text, seconds).
    nproc > 1: torchrun starts that many processes on this host; process 0's result is the result."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network: never wait on the hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    launcher = [sys.executable, "-u"] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                         if nproc > 1 else [])
    proc = subprocess.Popen(launcher + [os.path.abspath(script), f"--_{mode}", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: the child and its compile workers
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        else:
            tail = (tail + [line.rstrip()])[-15:]
            print("  | " + line.rstrip(), file=sys.stderr, flush=True)
    rc = proc.wait()
    if timer:
        timer.cancel()
    secs = time.perf_counter() - t0
    if result is None:
        why = f"timed out after {timeout:.0f}s" if rc == -signal.SIGKILL and timeout and secs >= timeout else f"exit {rc}"
        return None, f"{why}: " + " / ".join(tail[-6:]), secs
    return result, "", secs


def fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def text_table(cases: list[dict]) -> str:
    head = ["impl", "lora", "batch×seq", "step s", "tok/s", "×peft", "peak alloc GiB", "peak resv GiB",
            "predicted GiB", "load s", "status"]
    peft = {c["case"]: c.get("tokens_per_s") for c in cases if c["impl"] == "peft"}
    rows = [head]
    for c in cases:
        ratio = c["tokens_per_s"] / peft[c["case"]] if c.get("tokens_per_s") and peft.get(c["case"]) else None
        rows.append([c["impl"], c["lora"], f"{c['batch']}×{c['seq']}", fmt(c.get("step_s"), "{:.3f}"),
                     fmt(c.get("tokens_per_s"), "{:,.0f}"), fmt(ratio), fmt(c.get("peak_alloc_gib")),
                     fmt(c.get("peak_reserved_gib")), fmt(c.get("predicted_gib")), fmt(c.get("load_s"), "{:.1f}"),
                     c["status"].split(":")[0]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    ap.add_argument("--cases", default="standard", help="'standard' or comma-separated case names, e.g. "
                    "qv-r64-4x512; a case may name its own impls after a colon, joined by '/': "
                    "qv-r64-1x32768:peft/minilora+fast+offload")
    ap.add_argument("--impls", default=None, help="comma-separated; default: peft,minilora and every available "
                    f"variant of {VARIANTS}")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them (compile happens here)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every sequence length (CPU dry runs)")
    ap.add_argument("--device", default=None, help="default: cuda if torch sees a GPU, else cpu")
    ap.add_argument("--model-dir", default=None, help="where the random model is written; default "
                    "$TMPDIR/minilora-bench-<shape>, reused when it holds the same config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-timeout", type=float, default=300, help="seconds before a case's process is killed")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run: a case that would "
                    "likely overrun it (judged by the previous cases) is skipped, not started")
    ap.add_argument("--out", default=None, help="write the results (metadata + every case) here, after each case")
    ap.add_argument("--peak-tensors", type=int, default=0, metavar="N", help="after the timed steps, record one "
                    "more step's allocations and report the N largest tensors alive at its peak")
    ap.add_argument("--optimizer", default="adamw", help="TrainConfig.optimizer of the minilora@GiB impls: adamw, "
                    "adamw_8bit, paged_adamw_8bit or paged_adamw; the other impls run only with adamw (torch's)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    names = STANDARD if args.cases == "standard" else args.cases.split(",")
    cases = [dict(parse_case(n.split(":")[0], args.scale), impls=n.split(":")[1].split("/") if ":" in n else None)
             for n in names]
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"minilora-bench-{args.shape}")
    print(f"preparing {args.shape} in {model_dir} ...", file=sys.stderr, flush=True)
    env, err, _ = run_child("prepare", {"shape": args.shape, "model_dir": model_dir, "device": args.device}, 600)
    if env is None:
        raise SystemExit(f"could not prepare the model: {err}")
    args.device = env["device"]  # the parent never initialises CUDA: the prepare process chose
    impls = args.impls.split(",") if args.impls else ["peft", "minilora"] + [
        v for v in VARIANTS if set(variant_kwargs(v)) <= set(env["prepare_kwargs"])]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "card": env["card"], "driver": env["driver"], "versions": env["versions"],
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv), "shape": args.shape,
            "config": env["config"], "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "scale": args.scale, "seed": args.seed, "build_s": env["build_s"], "reused_model": env["reused_model"],
            "prepare_for_training_kwargs": env["prepare_kwargs"], "peft_recipe": PEFT_RECIPE,
            "minilora_recipe": MINILORA_RECIPE, "unsloth_recipe": UNSLOTH_RECIPE, "loop": LOOP,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "optimizer": args.optimizer, "cases": []}
    durations = []
    for case in cases:
        for impl in case.pop("impls") or impls:
            spec = dict(case, impl=impl, case=case["name"], model_dir=model_dir, device=args.device, seed=args.seed,
                        shape=args.shape,
                        steps=args.steps, warmup=args.warmup, peak_tensors=args.peak_tensors, optimizer=args.optimizer)
            row = {k: spec[k] for k in ("case", "impl", "lora", "targets", "r", "alpha", "dropout", "batch", "seq",
                                        "optimizer")}
            missing = set(variant_kwargs(impl)) - set(env["prepare_kwargs"]) if impl.startswith("minilora") else set()
            elapsed, guess = time.perf_counter() - t_start, (statistics.mean(durations) if durations else 0)
            if impl not in ("peft", "unsloth") and not impl.startswith("minilora") or (
                    "@" in impl and impl_budget(impl) is None):
                row["status"] = (f"unknown impl {impl!r}: use peft, unsloth, minilora, "
                                 "minilora+<prepare_for_training flag> or minilora@<GiB>")
            elif args.shape in NF4_ONLY and impl_budget(impl) is None:
                row["status"] = f"unavailable: {args.shape} is made as random NF4 at load, for minilora@GiB impls"
            elif missing:
                row["status"] = f"unavailable: prepare_for_training has no {sorted(missing)}"
            elif args.optimizer != "adamw" and impl_budget(impl) is None:
                row["status"] = f"unavailable: --optimizer {args.optimizer} is for minilora@GiB impls (train()'s step)"
            elif args.budget and elapsed + guess > args.budget:
                row["status"] = f"skipped: {elapsed:.0f}s used, a case takes ~{guess:.0f}s, budget {args.budget:.0f}s"
            else:
                print(f"[{elapsed:6.0f}s] {impl} {case['name']} ({case['batch']}x{case['seq']}) ...", file=sys.stderr, flush=True)
                left = args.budget - elapsed if args.budget else float("inf")  # always finish inside the budget
                res, err, secs = run_child("worker", spec, max(30.0, min(args.case_timeout, left)))
                durations.append(secs)
                status = res.pop("status", "ok") if res else f"error: {err}"
                row.update(res or {}, status=status, wall_s=secs)
            print(json.dumps(row), flush=True)
            meta["cases"].append(row)
            if args.out:
                _write(args.out, meta)
    meta["total_s"] = time.perf_counter() - t_start
    if args.out:
        _write(args.out, meta)
    print(f"\n{args.shape} on {env['card']} ({args.device}), {args.steps} timed steps after {args.warmup} warm-up, "
          f"optimizer {args.optimizer}, total {meta['total_s']:.0f}s", flush=True)
    print(text_table(meta["cases"]), flush=True)


def _write(path: str, meta: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--_prepare", "--_worker"):
        fn = prepare if sys.argv[1] == "--_prepare" else worker
        print(RESULT + json.dumps(fn(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
