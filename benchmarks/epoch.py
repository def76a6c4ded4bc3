#!/usr/bin/env python
"""The main job, timed: one epoch of guanaco-shaped rows through `minilora.train`, beside PEFT's recipe on the
same batches, in one invocation.

    python benchmarks/epoch.py --out benchmarks/results/h100-epoch.json        # fast default, 6 GiB, PEFT
    python benchmarks/epoch.py --impls fast,plain --max-steps 50 --curve        # loss curves, step by step
    python benchmarks/epoch.py --shape tiny --rows 24 --device cpu              # a CPU smoke run
    python benchmarks/epoch.py --impls fast,budget6,unsloth                     # beside Unsloth (see below)

The rows have the real dataset's shapes: benchmarks/guanaco-lengths.json holds, for each of the 1,000 rows of
mlabonne/guanaco-llama2-1k, every turn's prompt and answer length under the Llama-2 tokenizer. Each row here
is a guanaco-format text of random words with exactly those lengths under a word-level tokenizer written
beside the model (BOS + "[INST] q [/INST]" is the prompt, the answer ends with EOS), so minilora encodes,
truncates (max length 1024), groups and batches them as it would the real rows.

Impls, each in its own process on the same model files:
  fast      `ml.train` with the recipe's settings and nothing else: the default path and memory plan
  budget6   the same with memory_budget_gib=6
  budget4.8 the same with memory_budget_gib=4.8 (the plan offloads)
  eager     the same with cuda_graphs=False
  dora, rslora, budget6-dora  fast (or budget6) with the adapter variant on (use_dora=True, use_rslora=True)
  budget6-eager, budget4.8-eager  those two with cuda_graphs=False
  plain     the same with fast=False and every layer checkpointed: transformers' layers, the earlier default
  pack, budget6-pack, budget4.8-pack  fast, budget6 and budget4.8 with pack=True (micro-batches filled with whole
            examples: fewer, fuller steps)
  peft      the classic recipe (prepare_model_for_kbit_training, get_peft_model, HF's loss, torch AdamW,
            cosine schedule with 3% warmup, grad norm 0.3) driven over minilora's batches: the same examples
            in the same order and padding, the loss read every 25 steps, as TRL's logging does
  unsloth   Unsloth's own recipe, as its main-job run was measured: FastLanguageModel.from_pretrained(max_seq_length
            1024, load_in_4bit), get_peft_model(r 64, alpha 16, dropout 0.1, q_proj/v_proj,
            use_gradient_checkpointing="unsloth"), TRL's SFTTrainer (SFTConfig: batch 4, paged_adamw_32bit, lr 2e-4,
            weight decay 0.001, grad norm 0.3, 8 warm-up steps, group_by_length sampling, max length 1024, no
            packing, bf16, loss logged every 25 steps) on the rows as a `text` column, tokenized by the same
            word-level tokenizer. TRL trains on every token of a text row, so its supervised tokens are all tokens.
  unsloth-nockpt  the same with use_gradient_checkpointing=False (and gradient_checkpointing=False in SFTConfig)
The unsloth impls need Unsloth 2026.10.9 + TRL + datasets on the path, before anything else (the GPU kit's
../shared/device/stage-peers unpacks them into .peer-site); without them their rows say unavailable.
minilora's runs load the model as the example does (layer by layer into host memory when the budget's plan streams
the 4-bit weights) and train with the example's two sample prompts, answered greedily before and after training, as a
user of examples/train_guanaco.py waits for them (--no-samples: without).
Reported per impl: the loop's wall time (train() for minilora, from its first to its last step for PEFT,
trainer.train() for Unsloth), and for minilora where it went (train()'s own account: set-up, steps, eval,
samples, save), the first logged interval apart (warm-up: first kernels, caches) and the steady step time,
tokens/s over all and over supervised tokens, steps, peak allocated and reserved memory, and minilora's memory
plan. The table gives each run's speed against PEFT's and Unsloth's (their wall times over its) when they ran.
--curve logs every step's loss (max 50 steps, say) so that two impls' curves can be compared.

Several GPUs: `--gpus 1,2,4` runs each minilora impl under torchrun on 1, 2 and 4 GPUs of this host (PEFT and
Unsloth on one). train() then trains data-parallel with batch_size per GPU, and the table gives each run's
speed-up over one GPU. `--fixed 2x2048` replaces the guanaco rows by fixed-shape ones (B rows of T tokens per GPU
and step, a 16-token prompt and the rest answer, LoRA dropout 0) for --max-steps steps (default 30), timed by
the steady step after warm-up:

    python benchmarks/epoch.py --impls fast --gpus 1,2,4 --out benchmarks/results/h100x4-epoch.json
    python benchmarks/epoch.py --impls fast --gpus 1,2,4 --fixed 2x2048 --out benchmarks/results/h100x4-standard.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import SHAPES, _write, import_unsloth, prepare, run_child  # noqa: E402

LENGTHS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guanaco-lengths.json")
IMPLS = {"fast": {}, "budget6": {"memory_budget_gib": 6.0}, "budget4.8": {"memory_budget_gib": 4.8},
         "budget6-eager": {"memory_budget_gib": 6.0, "cuda_graphs": False},
         "budget4.8-eager": {"memory_budget_gib": 4.8, "cuda_graphs": False},
         "eager": {"cuda_graphs": False}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True},
         "budget6-dora": {"memory_budget_gib": 6.0, "use_dora": True},
         "plain": {"fast": False, "gradient_checkpointing": True},
         "pack": {"pack": True}, "budget6-pack": {"memory_budget_gib": 6.0, "pack": True},
         "budget4.8-pack": {"memory_budget_gib": 4.8, "pack": True},
         "peft": None, "unsloth": {"gradient_checkpointing": "unsloth"},
         "unsloth-nockpt": {"gradient_checkpointing": False}}
PEERS = ("peft", "unsloth", "unsloth-nockpt")  # their own loops, on one GPU
RECIPE = dict(epochs=1.0, batch_size=4, max_len=1024, lr=2e-4, lora_r=64, lora_alpha=16, lora_dropout=0.1,
              targets=("q_proj", "v_proj"), warmup_ratio=0.03, weight_decay=0.001, max_grad_norm=0.3,
              schedule="cosine", seed=42, log_every=25, precision="bf16")
GiB = 2**30


def write_word_tokenizer(out: str, vocab_size: int) -> str:
    """A word-level tokenizer: <unk> 0, <s> 1, </s> 2, "[INST]" 3, "[/INST]" 4, then words w5, w6, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, **{f"w{i}": i for i in range(5, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return out


def guanaco_rows(n_rows: int, vocab_size: int, seed: int = 0, lengths: list | None = None) -> list[str]:
    """Guanaco-format rows of random words whose token lengths are the real dataset's (see the module doc), or
    `lengths`: per row, its turns' (prompt, answer) token counts."""
    rng = random.Random(seed)
    if lengths is None:
        with open(LENGTHS) as f:
            lengths = json.load(f)["lengths"]
    lengths = lengths[:n_rows]

    def words(n):
        return " ".join(f"w{rng.randrange(5, vocab_size)}" for _ in range(max(0, n)))

    # prompt = BOS [INST] q [/INST]: q has p - 3 words; answer = words + EOS: a - 1 words (0: an empty answer)
    return ["".join(f"<s>[INST] {words(p - 3)} [/INST] {words(a - 1)} </s>" for p, a in row) for row in lengths]


def run_minilora(spec, cfg, model, tok, rows):
    import torch

    import minilora as ml

    with _profiled(spec.get("profile")):
        t0 = time.perf_counter()
        history = ml.train(model, tok, rows, cfg)
        wall = time.perf_counter() - t0
    logs = [h for h in history if "loss" in h]
    head = next(h for h in history if "train_rows" in h)
    parts = next(h["time"] for h in history if "time" in h)  # set-up, steps, eval, samples, save
    return dict(wall_s=wall, steps=logs[-1]["step"], memory_plan=head.get("memory_plan"), parts_s=parts,
                supervised_tokens=head["supervised_tokens"], interval_s=[(h["step"], h["seconds"]) for h in logs],
                losses=[(h["step"], h["loss"]) for h in logs], peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB
                if torch.cuda.is_available() else None, peak_alloc_gib=logs[-1]["peak_mem_gib"])


@contextlib.contextmanager
def _profiled(on: bool):
    """With `on`, a torch.profiler trace of the run; its busiest GPU ops, launch count and busy time to stderr."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=20), file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e6
    print(f"profile: {len(kernels)} GPU kernels, {busy:.2f} s busy of {wall:.2f} s wall", file=sys.stderr)


def run_peft(spec, model_dir, tok, rows):
    """The classic recipe over minilora's batches (the same examples, order and padding as `fast`)."""
    import math

    import torch

    import minilora as ml
    from minilora.data import batches
    from minilora.template import encode_rows
    from step import load_peft

    device = torch.device(spec["device"])
    r = RECIPE
    model, _ = load_peft(dict(model_dir=model_dir, device=spec["device"], seed=r["seed"], r=r["lora_r"],
                              alpha=r["lora_alpha"], dropout=r["lora_dropout"], targets=r["targets"]))
    model.train()
    examples, stats = encode_rows(rows, tok, r["max_len"])
    collate = ml.Collator(tok.pad_token_id)
    order = list(batches(examples, r["batch_size"], r["seed"], group_by_length=True, epoch=0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])
    total, warmup = len(order), int(r["warmup_ratio"] * len(order))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, window, intervals, t0 = [], [], [], time.perf_counter()
    t_mark = t0
    for step, batch in enumerate(order, 1):
        b = {k: v.to(device) for k, v in collate(batch).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if step % r["log_every"] == 0 or step == total:
            losses.append((step, torch.stack(window).mean().item()))
            now = time.perf_counter()
            intervals.append((step, now - t_mark))
            t_mark, window = now, []
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, steps=total, supervised_tokens=stats.supervised, losses=losses,
                interval_s=intervals, peak_alloc_gib=torch.cuda.max_memory_allocated() / GiB if device.type == "cuda"
                else None, peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB if device.type == "cuda" else None)


def run_unsloth(spec, rows):
    """Unsloth's recipe (see the module doc): its model and LoRA, TRL's SFTTrainer on the rows' text."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    r = {**RECIPE, **spec["overrides"]}
    model, tok = FastLanguageModel.from_pretrained(spec["model_dir"], max_seq_length=r["max_len"], load_in_4bit=True,
                                                   tokenizer_name=spec["tok_dir"])
    model = FastLanguageModel.get_peft_model(model, r=r["lora_r"], lora_alpha=r["lora_alpha"],
                                             lora_dropout=r["lora_dropout"], target_modules=list(r["targets"]),
                                             use_gradient_checkpointing=r["gradient_checkpointing"],
                                             random_state=r["seed"])
    args = SFTConfig(output_dir=spec["out_dir"], per_device_train_batch_size=r["batch_size"], optim="paged_adamw_32bit",
                     learning_rate=r["lr"], weight_decay=r["weight_decay"], max_grad_norm=r["max_grad_norm"],
                     warmup_steps=8, max_length=r["max_len"], packing=False, bf16=True, logging_steps=r["log_every"],
                     num_train_epochs=r["epochs"], max_steps=r.get("max_steps") or -1, seed=r["seed"],
                     report_to="none", save_strategy="no",
                     **({"train_sampling_strategy": "group_by_length"} if hasattr(SFTConfig, "train_sampling_strategy")
                        else {"group_by_length": True}),  # transformers 5 renamed it
                     **({} if r["gradient_checkpointing"] else {"gradient_checkpointing": False}))
    losses, intervals = [], []

    class Clock(TrainerCallback):  # the logged losses and the time between logs, as the other impls report them
        def on_train_begin(self, args, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last steps' loss too, as PEFT's loop logs it

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                now = time.perf_counter()
                losses.append((state.global_step, float(logs["loss"])))
                intervals.append((state.global_step, now - self.mark))
                self.mark = now

    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": rows}),
                         processing_class=tok, callbacks=[Clock()])
    tokens = sum(min(len(ids), r["max_len"]) for ids in trainer.train_dataset["input_ids"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return dict(wall_s=wall, steps=trainer.state.global_step, tokens=tokens, supervised_tokens=tokens, losses=losses,
                interval_s=intervals, peak_alloc_gib=torch.cuda.max_memory_allocated() / GiB if cuda else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB if cuda else None)


def worker(spec: dict) -> dict | None:
    why = import_unsloth() if spec["impl"].startswith("unsloth") else None  # first: it patches transformers
    if why:
        return {"status": why}
    import torch
    import torch.distributed as dist

    import minilora as ml

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from train_guanaco import GUANACO_PROMPTS, check_memory, setup_device

    from minilora.host_load import load_streamed
    from minilora.model import load_config

    spec["prompts"] = GUANACO_PROMPTS if spec["samples"] else ()  # the example's greedy samples, before and after
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: the example's set-up (one GPU per process); train() runs data-parallel
        spec["device"] = setup_device()
    tok = ml.load_tokenizer(spec["tok_dir"])
    rows = guanaco_rows(spec["rows"], spec["vocab"], spec["seed"], spec.get("lengths"))
    examples, _ = ml.encode_rows(rows, tok, {**RECIPE, **spec["overrides"]}["max_len"])
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    t0 = time.perf_counter()
    if spec["impl"] == "peft":
        res = run_peft(spec, spec["model_dir"], tok, rows)
    elif spec["impl"].startswith("unsloth"):
        res = run_unsloth(spec, rows)
        res["load_s"] = time.perf_counter() - t0 - res["wall_s"]  # model, LoRA and the trainer's tokenizing
    else:
        # as the example loads: layer by layer into host memory when the budget's plan streams the 4-bit weights
        cfg = ml.TrainConfig(output_dir=spec["out_dir"], progress=False, sample_prompts=spec["prompts"],
                             **{**RECIPE, **spec["overrides"]})
        streams = spec["device"].startswith("cuda") and not cfg.fsdp and check_memory(
            load_config(spec["model_dir"]), cfg, "nf4", cfg.fast, spec["device"])
        model, _ = (load_streamed if streams else ml.load_model)(
            spec["model_dir"], quant="nf4", compute_dtype=torch.bfloat16, device=spec["device"],
            tokenizer=spec["tok_dir"])
        load_s = time.perf_counter() - t0
        if world > 1:
            dist.barrier()  # every process has loaded: train() starts, and is timed, together
        res = run_minilora(spec, cfg, model, tok, rows)
        res["load_s"] = load_s
    if world > 1:
        dist.destroy_process_group()
        if int(os.environ["RANK"]):
            return None  # process 0 reports
    tokens = res.setdefault("tokens", tokens)  # Unsloth's: as TRL tokenized and truncated them
    res.update(world=world, tokens_per_s=tokens / res["wall_s"],
               supervised_tokens_per_s=res["supervised_tokens"] / res["wall_s"])
    # warm-up: what the first logged interval took beyond its steps at the steady pace of the others
    (s0, t_first), rest = (res["interval_s"] or [(0, 0)])[0], res["interval_s"][1:]
    if rest:
        steady = (sum(t for _, t in rest)) / (res["interval_s"][-1][0] - s0)
        res.update(steady_step_s=steady, warmup_s=t_first - s0 * steady)
        if spec.get("step_tokens"):  # fixed shapes: every step has the same tokens
            res["steady_tokens_per_s"] = spec["step_tokens"] * world / steady
    return res


def impl_overrides(impl: str, cases: list) -> dict | None:
    """An impl's TrainConfig fields: IMPLS's, or `budgetGIB` (a memory budget of GIB), or `budget-unsloth` (the
    peak that Unsloth's run reached earlier in this invocation: minilora within Unsloth's memory)."""
    if impl in IMPLS:
        return IMPLS[impl]
    if impl == "budget-unsloth":
        peak = next((c["peak_alloc_gib"] for c in cases if c["impl"] == "unsloth" and c["status"] == "ok"), None)
        if peak is None:
            raise SystemExit("budget-unsloth needs an unsloth run before it in --impls, which succeeded")
        return {"memory_budget_gib": math.floor(peak * 100) / 100}  # at most its peak
    m = re.fullmatch(r"budget(\d+(?:\.\d+)?)", impl)
    if not m:
        raise SystemExit(f"unknown impl {impl!r}; use one of {list(IMPLS)}, budgetGIB or budget-unsloth")
    return {"memory_budget_gib": float(m[1])}


def summarize(c: dict) -> str:
    name = f"{c['impl']} x{c.get('gpus', 1)}"
    if c.get("status") != "ok":
        return f"{name:10}  {c['status']}"
    peak = "-" if c.get("peak_alloc_gib") is None else f"{c['peak_alloc_gib']:.2f}"
    warm = f"  warm-up {c['warmup_s']:.1f} s, then {c['steady_step_s'] * 1e3:.0f} ms/step" if "warmup_s" in c else ""
    steady = f"  {c['steady_tokens_per_s']:8,.0f} steady tok/s" if "steady_tokens_per_s" in c else ""
    parts = ("  (" + ", ".join(f"{k} {v:.1f}" for k, v in c["parts_s"].items()) + " s)") if "parts_s" in c else ""
    return (f"{name:10}  {c['wall_s']:7.1f} s  {c['steps']:4d} steps  {c['tokens_per_s']:8,.0f} tok/s{steady}  "
            f"{c['supervised_tokens_per_s']:8,.0f} sup tok/s  peak {peak} GiB{warm}{parts}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="fast,budget6,peft",
                    help=f"comma-separated, from {list(IMPLS)}, budgetGIB (e.g. budget5.5) or budget-unsloth")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    ap.add_argument("--rows", type=int, default=1000, help="the first N rows of the dataset's shapes")
    ap.add_argument("--max-steps", type=int, default=None, help="stop minilora's and Unsloth's runs after N steps")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts for minilora's impls, e.g. 1,2,4")
    ap.add_argument("--fixed", default=None, metavar="BxT", help="fixed-shape rows: B rows of T tokens per GPU "
                    "and step, LoRA dropout 0, --max-steps steps (default 30)")
    ap.add_argument("--curve", action="store_true", help="log every step's loss (for comparing curves)")
    ap.add_argument("--no-samples", action="store_true", help="without the example's greedy samples before and "
                    "after training")
    ap.add_argument("--profile", action="store_true", help="trace minilora's runs with torch.profiler (slower)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=420, help="seconds before an impl's process is killed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir = args.model_dir or os.path.join(tempfile.gettempdir(), f"minilora-bench-{args.shape}")
    env, err, _ = run_child("prepare", {"shape": args.shape, "model_dir": model_dir, "device": args.device}, 900)
    if env is None:
        raise SystemExit(f"could not prepare the model: {err}")
    vocab = env["config"]["vocab_size"]
    tok_dir = write_word_tokenizer(os.path.join(model_dir, "word-tokenizer"), vocab)
    gpus = [int(n) for n in args.gpus.split(",")]
    base = {}
    if args.fixed:
        b, t = (int(v) for v in args.fixed.split("x"))
        args.max_steps = args.max_steps or 30
        base = dict(batch_size=b, max_len=t, lora_dropout=0.0, log_every=5)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "card": env["card"],
            "driver": env["driver"], "versions": env["versions"], "shape": args.shape, "rows": args.rows,
            "fixed": args.fixed, "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "recipe": {**RECIPE, **base}, "cases": []}
    for impl in args.impls.split(","):
        for n in [1] if impl in PEERS else gpus:
            overrides = dict(base, **(impl_overrides(impl, meta["cases"]) or {}))
            if args.max_steps:
                overrides["max_steps"] = args.max_steps
            if args.curve:
                overrides["log_every"] = 1
            rows, lengths, step_tokens = args.rows, None, None
            if args.fixed:  # exactly max_steps global batches of b rows per GPU
                rows, step_tokens = args.max_steps * b * n, b * t
                lengths = [[(16, t - 16)]] * rows
            spec = dict(impl=impl, model_dir=model_dir, tok_dir=tok_dir, rows=rows, vocab=vocab, seed=args.seed,
                        device=env["device"], overrides=overrides, lengths=lengths, step_tokens=step_tokens,
                        out_dir=tempfile.mkdtemp(prefix=f"epoch-{impl}-"), profile=args.profile,
                        samples=not (args.no_samples or args.fixed))
            print(f"{impl} on {n} GPU(s) ...", file=sys.stderr, flush=True)
            res, err, secs = run_child("run", spec, args.timeout, script=__file__, nproc=n)
            status = res.pop("status", "ok") if res else f"error: {err}"
            case = dict(impl=impl, gpus=n, overrides=overrides, process_s=secs, **(res or {}), status=status)
            meta["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k not in ("losses", "interval_s")}), flush=True)
            if args.out:
                _write(args.out, meta)
    print(f"\n{args.fixed + ' rows' if args.fixed else f'{args.rows} guanaco-shaped rows'} on {env['card']}:")
    ok = [c for c in meta["cases"] if c.get("status") == "ok"]
    refs = [(name, next((c for c in ok if c["impl"] == impl), None))
            for impl, name in (("peft", "PEFT"), ("unsloth", "Unsloth"))]
    speed = "steady_tokens_per_s" if args.fixed else "tokens_per_s"
    for c in meta["cases"]:
        one = next((o for o in ok if o["impl"] == c["impl"] and o["gpus"] == 1), None)
        ratio = "".join(f"  {ref['wall_s'] / c['wall_s']:.2f}x {name}" for name, ref in refs
                        if ref and c in ok and c["gpus"] == 1)
        if one and c in ok and c["gpus"] > 1 and speed in c and speed in one:
            c["speedup"] = c[speed] / one[speed]
            ratio = f"  {c['speedup']:.2f}x one GPU's {speed.replace('_', ' ')}"
        print(summarize(c) + ratio)
    if args.out:
        _write(args.out, meta)
    curves = {c["impl"]: dict(c["losses"]) for c in ok}
    if args.curve and len(curves) == 2:
        (a, ca), (b, cb) = curves.items()
        rel = max(abs(ca[s] - cb[s]) / abs(cb[s]) for s in ca.keys() & cb.keys())
        meta["curve_max_rel_diff"] = rel
        print(f"loss curves {a} vs {b}: max relative difference {rel:.2e} over {len(ca.keys() & cb.keys())} steps")
        if args.out:
            _write(args.out, meta)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--_prepare", "--_run"):
        fn = prepare if sys.argv[1] == "--_prepare" else worker
        result = fn(json.loads(sys.argv[2]))
        if result is not None:
            print("@@result " + json.dumps(result), flush=True)
    else:
        main()
