"""Fine-tune Llama 2 on mlabonne/guanaco-llama2-1k with QLoRA, as the classic PEFT + TRL notebook does.

    python examples/train_guanaco.py                     # Llama-2-7b-chat from the hub, needs a GPU and internet
    python examples/train_guanaco.py --preset tiny       # offline demo on the CPU, about two minutes
    python examples/train_guanaco.py --model DIR --dataset rows.jsonl --max-steps 100

The adapter lands in OUTPUT_DIR/adapter/ in PEFT's format; `examples/chat.py` talks to it.
"""

import argparse
import os
import sys

import torch
from transformers import AutoConfig

import minilora as ml
from minilora.data import split_eval
from minilora.train import PRECISIONS

DEFAULT_MODEL = "NousResearch/Llama-2-7b-chat-hf"
DEFAULT_DATASET = "mlabonne/guanaco-llama2-1k"

# --preset tiny: a small LLaMA-2 built and pretrained on the spot (minilora.tiny.build_base), then fine-tuned
# with the same 4-bit base, LoRA and loop on synthetic instructions. Flags given explicitly still win.
TINY = dict(output_dir="out/tiny", max_steps=300, batch_size=8, lr=2e-3, max_len=256, lora_r=16, lora_alpha=32,
            lora_dropout=0.05, eval_every=100, log_every=10, precision="fp32")
TINY_PROMPTS = ("Which is bigger, 3 or 8?", "What is the opposite of fast?", "Repeat after me: moon ship bread")
GUANACO_PROMPTS = ("What is a large language model?", "Escribe un poema corto sobre el mar.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny"], help="tiny: the offline CPU demo")
    p.add_argument("--pretrain-steps", type=int, default=500, help="--preset tiny: steps that pretrain the base")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local dir of a LLaMA-2 checkpoint")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id, or a .jsonl/.json/.parquet/.csv file")
    p.add_argument("--output-dir", default="out/guanaco")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated linear names")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    p.add_argument("--precision", choices=list(PRECISIONS), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", help="a checkpoint dir, or 'latest'")
    p.add_argument("--eval-every", type=int, help="steps between evaluations on the held-out split")
    p.add_argument("--eval-size", type=float, default=0.05, help="held-out fraction (or count) of the rows")
    p.add_argument("--save-every", type=int)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--pack", action="store_true", help="pack several examples into each row")
    p.add_argument("--offload", action="store_true", help="keep checkpointed activations in CPU memory")
    p.add_argument("--fused", action="store_true", help="fused LoRA autograd function (faster, same numbers)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (fastest on a GPU)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adamw_8bit, paged_adamw_8bit or paged_adamw")
    args = p.parse_args(argv)
    if args.preset == "tiny":  # preset values, unless the flag was given on the command line
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in TINY.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    return args


def fail(what: str, error: Exception):
    print(f"error: could not load {what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
          "Without a network, run the offline demo:  python examples/train_guanaco.py --preset tiny\n"
          "or point at local files:  --model /path/to/llama-2-dir --dataset rows.jsonl", file=sys.stderr)
    sys.exit(2)


def load(args, device):
    """(model, tokenizer, train_rows, eval_rows, sample prompts) for the preset or the given model and data."""
    compute_dtype = PRECISIONS[args.precision]
    quant = None if args.quant == "none" else args.quant
    if args.preset == "tiny":
        from minilora.tiny import build_base, instruction_rows

        base = os.path.join(args.output_dir, "base")
        if not os.path.isfile(os.path.join(base, "config.json")):  # a resumed run keeps the base it started on
            print(f"building a tiny pretrained LLaMA-2 in {base} ...")
            build_base(base, steps=args.pretrain_steps, seed=args.seed)
        show_plan(AutoConfig.from_pretrained(base), args, quant, compute_dtype)
        model, tok = ml.load_model(base, quant=quant, compute_dtype=compute_dtype, device=device)
        train_rows = instruction_rows(800, seed=args.seed)
        seen = set(train_rows)
        eval_rows = [r for r in instruction_rows(80, seed=args.seed + 1) if r not in seen]  # held out
        return model, tok, train_rows, eval_rows, TINY_PROMPTS
    try:
        rows = ml.load_rows(args.dataset)
    except Exception as e:  # missing files, network and hub errors: one clear message, no stack trace
        fail(f"dataset {args.dataset!r}", e)
    try:
        show_plan(AutoConfig.from_pretrained(args.model), args, quant, compute_dtype)
        model, tok = ml.load_model(args.model, quant=quant, compute_dtype=compute_dtype, device=device)
    except Exception as e:
        fail(f"model {args.model!r}", e)
    train_rows, eval_rows = split_eval(rows, args.eval_size, seed=args.seed)
    return model, tok, train_rows, eval_rows, GUANACO_PROMPTS


def show_plan(config, args, quant, compute_dtype):
    """Print the predicted peak GPU memory of a step at full length, and warn when the card has less free."""
    plan = ml.plan_memory(config, args.batch_size, args.max_len, lora_r=args.lora_r,
                          lora_targets=args.targets.split(","), quant=quant, compute_dtype=compute_dtype,
                          offload=args.offload, lora_dropout=args.lora_dropout)
    need = (plan["total"] + plan["cuda_context"]) / 2**30
    print(f"predicted peak GPU memory at batch {args.batch_size} x {args.max_len} tokens: {need:.2f} GiB")
    print(ml.format_plan(plan))
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0] / 2**30
        if need > free:
            print(f"warning: the GPU has {free:.2f} GiB free, less than the predicted {need:.2f} GiB; lower "
                  "--batch-size or --max-len, or pass --offload", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    torch.manual_seed(args.seed)
    model, tok, train_rows, eval_rows, prompts = load(args, device)
    cfg = ml.TrainConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, max_len=args.max_len, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, targets=tuple(args.targets.split(",")),
        precision=args.precision, seed=args.seed, resume=args.resume, eval_every=args.eval_every,
        save_every=args.save_every, log_every=args.log_every, pack=args.pack, offload_activations=args.offload,
        fused=args.fused, compile=args.compile,
        optimizer=args.optimizer, sample_prompts=prompts,
    )
    history = ml.train(model, tok, train_rows, cfg, eval_rows=eval_rows)
    return report(history, cfg, args.preset == "tiny")


def report(history, cfg, is_demo: bool) -> int:
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    samples = [h for h in history if "sample" in h]
    print(f"\nadapter: {os.path.join(cfg.output_dir, 'adapter')}   metrics: {os.path.join(cfg.output_dir, 'metrics.jsonl')}")
    for prompt in cfg.sample_prompts:
        answers = [h["sample"] for h in samples if h["prompt"] == prompt]
        if len(answers) >= 2:
            print(f"\n[INST] {prompt} [/INST]\n  before: {answers[0]!r}\n  after:  {answers[-1]!r}")
    if len(evals) < 2:
        return 0
    drop = 1 - evals[-1] / evals[0]
    print(f"\nheld-out eval loss {evals[0]:.3f} -> {evals[-1]:.3f} ({drop:.0%} lower)")
    if is_demo and drop < 0.3:
        print("the demo expects the eval loss to fall by at least 30%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
