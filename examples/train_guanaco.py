"""Fine-tune Llama 2 on mlabonne/guanaco-llama2-1k with QLoRA, as the classic PEFT + TRL notebook does.

    python examples/train_guanaco.py                     # Llama-2-7b-chat from the hub, needs a GPU and internet
    python examples/train_guanaco.py --preset tiny       # offline demo on the CPU, about two minutes
    python examples/train_guanaco.py --model DIR --dataset rows.jsonl --max-steps 100

The rows are read, checked and encoded before the model loads, so a bad dataset fails in seconds. Malformed
rows are skipped and counted (--strict stops at the first). The adapter lands in OUTPUT_DIR/adapter/ in PEFT's
format; `examples/chat.py` talks to it.
"""

import argparse
import dataclasses
import inspect
import os
import re
import shlex
import sys

import torch
import torch.distributed as dist
import transformers

import minilora as ml
from minilora.data import check_eval_size
from minilora.checkpoint import check_resume, run_shape
from minilora.lora import check_targets
from minilora.kernels.layer import unsupported
from minilora.host_load import load_streamed
from minilora.model import linear_names, load_config, meta_model
from minilora.plan_choice import memory_budget, plannable
from minilora.rundir import begun_on, claim, latest_checkpoint
from minilora.config import PRECISIONS, default_precision

DEFAULT_MODEL = "NousResearch/Llama-2-7b-chat-hf"
DEFAULT_DATASET = "mlabonne/guanaco-llama2-1k"

# --preset tiny: a small LLaMA-2 built and pretrained on the spot (minilora.tiny.build_base), then fine-tuned
# with the same 4-bit base, LoRA and loop on synthetic instructions. Flags given explicitly still win, except
# --model and --dataset, which the preset replaces (it refuses them).
TINY = dict(output_dir="out/tiny", max_steps=300, batch_size=8, lr=2e-3, max_len=256, lora_r=16, lora_alpha=32,
            lora_dropout=0.05, eval_every=100, log_every=10, precision="fp32")
TINY_PROMPTS = ("Which is bigger, 3 or 8?", "What is the opposite of fast?", "Repeat after me: moon ship bread")
GUANACO_PROMPTS = ("What is a large language model?", "Escribe un poema corto sobre el mar.")


# TrainConfig fields that the example sets itself: the preset's or the recipe's prompts, and --strict
OWN = {"sample_prompts", "skip_malformed"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny"], help="tiny: the offline CPU demo")
    p.add_argument("--pretrain-steps", type=int, default=500, help="--preset tiny: steps that pretrain the base")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or local dir of a causal LM checkpoint (LLaMA 2 or 3, Mistral, Qwen2, ...)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="hub id, or a .jsonl/.json/.parquet/.csv file")
    p.add_argument("--text-field", default="text", help="the dataset's field of guanaco-format strings")
    p.add_argument("--messages-field", default="messages",
                   help="the field of message lists, read when there is no --text-field")
    p.add_argument("--eval-size", type=eval_size, default=0.05,
                   help="held-out rows: a fraction below 1 (0.05), a whole number (50), or 0 for no evaluation")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed row instead of skipping it")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"], help="the base's 4-bit type, or none")
    config_flags(p.add_argument_group("training (minilora.TrainConfig; defaults: the classic guanaco recipe)"))
    args = p.parse_args(argv)
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.preset == "tiny":  # preset values, unless the flag was given on the command line
        if given & {"--model", "--dataset"}:
            p.error("--preset tiny builds its own model and data; drop --model and --dataset, or drop --preset")
        for key, value in TINY.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    return args


def config_flags(group):
    """A flag for each TrainConfig field, with the field's default and its comment in config.py as the help: a
    default exists once. bool fields are switches (--pack, --no-fast); bool-or-None ones take auto/on/off;
    tuples take comma-separated names."""
    comments = dict(re.findall(r"^    (\w+): [^=]+=.*?#\s*(.*)$", inspect.getsource(ml.TrainConfig), re.M))
    for f in dataclasses.fields(ml.TrainConfig):
        if f.name in OWN:
            continue
        flag, kind, text = "--" + f.name.replace("_", "-"), str(f.type), comments.get(f.name, "")
        if kind == "bool":
            off = f.default is True
            group.add_argument(flag.replace("--", "--no-") if off else flag, dest=f.name, default=f.default,
                               action="store_false" if off else "store_true",
                               help=f"turn off: {text}" if off else text)
        elif kind == "bool | None":
            group.add_argument(flag, dest=f.name, default=None, metavar="auto|on|off", type=auto_on_off,
                               help=f"{text} (auto: None)")
        else:
            parse = {"tuple": lambda v: tuple(v.split(",")) if v else ()}.get(kind) or \
                {"int": int, "float": float}.get(kind.split(" ")[0], str)
            group.add_argument(flag, dest=f.name, type=parse, default=f.default,
                               help=f"{text} (default: {','.join(f.default) if kind == 'tuple' else f.default})")


def auto_on_off(text: str) -> bool | None:
    try:
        return {"auto": None, "on": True, "off": False}[text]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, on or off") from None


def eval_size(text: str) -> float | int:
    """--eval-size: "0.05" reads as a fraction and "50" as a number of rows; split_eval's rule checks both."""
    try:
        return check_eval_size(int(text) if text.isdigit() else float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(message: str, offline_hint: bool = False):
    print(f"error: {message}", file=sys.stderr)
    if offline_hint:
        print("Without a network, run the offline demo:  python examples/train_guanaco.py --preset tiny\n"
              "or point at local files:  --model /path/to/llama-2-dir --dataset rows.jsonl", file=sys.stderr)
    sys.exit(2)


def attempt(what: str, load):
    """load(), or exit with one clear message: missing files, network and hub errors, a non-LLaMA model."""
    try:
        return load()
    except Exception as e:
        fail(f"could not load {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
             offline_hint=isinstance(e, OSError))


def load_data(args, cfg):
    """(model source, its config, tokenizer, train data, eval data or None): the rows read, split and encoded,
    and the model's config checked, before any weight loads."""
    if args.preset == "tiny":
        from minilora.tiny import build_base, instruction_rows

        source = os.path.join(args.output_dir, "base")
        # a resumed run keeps the base it started on; under torchrun process 0 builds it while the others wait
        if not os.path.isfile(os.path.join(source, "config.json")) and not (dist.is_initialized() and dist.get_rank()):
            print(f"building a tiny pretrained LLaMA-2 in {source} ...")
            build_base(source, steps=args.pretrain_steps, seed=args.seed,
                       progress=args.progress and sys.stderr.isatty())
        if dist.is_initialized():
            dist.barrier()
        rows = instruction_rows(800, seed=args.seed)
        seen = set(rows)
        held_out = [r for r in instruction_rows(80, seed=args.seed + 1) if r not in seen] if args.eval_size else []
        parts = [range(len(rows)), range(len(rows), len(rows) + len(held_out))]
        rows += held_out
    else:
        source = args.model
        rows = attempt(f"dataset {args.dataset!r}",
                       lambda: ml.load_rows(args.dataset, text_field=args.text_field, messages_field=args.messages_field))
        try:
            parts = ml.split_eval(range(len(rows)), args.eval_size, seed=args.seed)
        except ValueError as e:
            fail(str(e))
    config = attempt(f"model {source!r}", lambda: load_config(source))
    tok = attempt(f"tokenizer of {source!r}", lambda: ml.load_tokenizer(source))
    # a resumed run's chat template writes the date its examples had (Llama 3.1's "Today Date")
    template = ml.get_template(cfg.template, tok).dated(begun_on(cfg.output_dir, cfg.resume))
    train_data, eval_data = (encode(rows, index, tok, cfg, template) if index else None for index in parts)
    malformed = sorted(m for data in (train_data, eval_data) if data for m in data[1].malformed)
    if malformed:
        shown = ", ".join(f"{i} ({reason})" for i, reason in malformed[:5]) + (" ..." if len(malformed) > 5 else "")
        print(f"skipped {len(malformed)} malformed rows of {len(rows)}: {shown}; --strict stops at the first")
    return source, config, tok, train_data, eval_data


def encode(rows, index, tok, cfg, template):
    """encode_rows over rows[i] for i in index; a malformed row is named by its place in the whole dataset."""
    try:
        examples, stats = ml.encode_rows([rows[i] for i in index], tok, cfg.max_len, cfg.skip_malformed, template)
    except ml.MalformedRow as e:
        e.index = index[e.index]
        fail(str(e))
    except ValueError as e:  # no example left
        fail(str(e))
    stats.malformed = [(index[i], reason) for i, reason in stats.malformed]
    return examples, stats


def check_memory(config, cfg, quant, fast: bool, device: str) -> bool:
    """Before the weights load: warn when even the leanest plan that the flags allow (every layer checkpointed
    unless they say otherwise, nothing cached) exceeds the budget; refuse when the plan streams the 4-bit weights
    from host memory and the host has not that much free. Returns whether it streams (the model then loads in
    host memory). train() prints the plan it picks once the model is there."""
    budget, _ = memory_budget(cfg, torch.device(device))
    setup = ml.Setup(lora=cfg.lora(), quant=quant, compute_dtype=PRECISIONS[cfg.precision], optimizer=cfg.optimizer)
    choice = ml.choose_plan(config, cfg.batch_size, cfg.max_len, budget, fixed=cfg.fixed_plan(), setup=setup,
                            fast=fast)
    if not choice["fits"]:
        need = choice["plan"]["total"] / 2**30
        print(f"warning: a step at batch {cfg.batch_size} x {cfg.max_len} tokens needs at least {need:.2f} GiB, "
              f"more than the {budget / 2**30:.2f} GiB budget; lower --batch-size or --max-len",
              file=sys.stderr)
    host, free = choice["plan"]["cpu"], os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if choice["options"].stream and host > free:
        fail(f"the plan for a {budget / 2**30:.1f} GiB budget streams the 4-bit weights from host memory: it needs "
             f"{host / 2**30:.1f} GiB pinned there, and this machine has {free / 2**30:.1f} GiB free; give it a "
             "larger --memory-budget-gib, or a machine with more memory")
    return choice["options"].stream


def setup_device() -> str:
    """This process's device. Under torchrun (WORLD_SIZE > 1) it also joins the process group: NCCL with one
    GPU per process (LOCAL_RANK), or gloo on CPUs. train() then runs data-parallel; processes other than 0
    print nothing but errors."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return "cuda" if cuda else "cpu"
    local = int(os.environ["LOCAL_RANK"])
    if cuda:  # NCCL then starts here, with the GPU it will use, not at the first collective
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")
    return f"cuda:{local}" if cuda else "cpu"


def main(argv=None):
    args = parse_args(argv)
    device = setup_device()
    if not (args.progress and sys.stderr.isatty()):  # no progress bars (and their carriage returns) in a log file
        transformers.utils.logging.disable_progress_bar()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(args.seed)
    try:  # every setting is checked here, before anything loads
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ml.TrainConfig) if f.name not in OWN}
        cfg = ml.TrainConfig(**fields, skip_malformed=not args.strict,
                             sample_prompts=TINY_PROMPTS if args.preset == "tiny" else GUANACO_PROMPTS)
        cfg.precision = cfg.precision or default_precision(device)
        run = claim(cfg.output_dir, cfg.resume, cfg.overwrite, rank)  # this run's output dir, locked, or refused
    except ValueError as e:
        fail(str(e))
    quant = None if args.quant == "none" else args.quant
    try:
        source, config, tok, train_data, eval_data = load_data(args, cfg)
        streams = check_before_loading(cfg, run, (source, config, train_data[0], world), quant, device)
        # sharded: each process loads the model into host memory, and train() sends only its shards to the GPU;
        # streamed: each linear is quantized on the GPU and parked in host memory, the rest goes to the GPU
        load = load_streamed if streams else ml.load_model
        model, _ = attempt(f"model {source!r}", lambda: load(
            source, quant=quant, compute_dtype=PRECISIONS[cfg.precision], device="cpu" if cfg.fsdp else device,
            tokenizer=tok, config=config))
        history = ml.train(model, tok, train_data, cfg, eval_rows=eval_data)
    except KeyboardInterrupt as e:
        return interrupted(e, cfg, argv, world)
    except (FloatingPointError, ml.CheckpointWriteError) as e:  # a diverged run; a full disk
        fail(str(e))
    finally:
        run.release()  # train() has released it already, unless something failed before
    if dist.is_initialized():
        dist.destroy_process_group()
    return report(history, cfg, args.preset == "tiny")


def check_before_loading(cfg, run, what: tuple, quant, device: str) -> bool:
    """The targets against the architecture, a resumed checkpoint against this run, the length and the memory,
    all without weights; whether the memory plan streams the weights. what: (model source, its config, the
    encoded training examples, process count)."""
    source, config, examples, world = what
    architecture = meta_model(config)  # its modules, on the meta device: no memory, no weights
    try:
        check_targets(linear_names(architecture), cfg.targets)
        check_resume(run, run_shape(cfg, examples, source, world), cfg)
    except ValueError as e:
        fail(str(e))
    why = "--no-fast" if not cfg.fast else "--fsdp" if cfg.fsdp else unsupported(architecture, cfg.max_len)
    print(f"{source}: a {config.model_type} model ({type(architecture).__name__}); it trains on "
          + (f"transformers' decoder layers ({why})" if why else "minilora's fast layers"))
    if cfg.max_len > config.max_position_embeddings:
        print(f"warning: --max-len {cfg.max_len} is beyond the {config.max_position_embeddings} positions this "
              "model was trained on; longer examples may train poorly", file=sys.stderr)
    if device.startswith("cuda") and not cfg.fsdp and plannable(architecture):  # one GPU's memory, unsharded
        return check_memory(config, cfg, quant, not why, device)
    return False


def interrupted(e: KeyboardInterrupt, cfg, argv, world: int) -> int:
    """A stop by signal (Ctrl-C, or a scheduler's SIGTERM): say what was saved and how to go on; exit with 128 + the
    signal's number, as a shell reports a command that a signal ended (130 for Ctrl-C, 143 for SIGTERM)."""
    print(f"\n{e}" if isinstance(e, ml.Interrupted) else "\ninterrupted at once: the steps since the last "
          "checkpoint are lost", file=sys.stderr)
    if latest_checkpoint(cfg.output_dir) and not (dist.is_initialized() and dist.get_rank()):
        words, kept = argv if argv is not None else sys.argv[1:], []
        for k, word in enumerate(words):  # the same command, with --resume latest in place of --resume/--overwrite
            if word in ("--resume", "--overwrite") or word.startswith("--resume=") or words[k - 1:k] == ["--resume"]:
                continue
            kept.append(word)
        launch = ["python"] if world == 1 else ["torchrun", "--nproc-per-node", str(world)]
        print("resume with:  " + shlex.join([*launch, "examples/train_guanaco.py", *kept, "--resume", "latest"]),
              file=sys.stderr)
    return e.exit_status if isinstance(e, ml.Interrupted) else 130


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
