"""TrainConfig: every knob of a run in one dataclass, a comment per field, checked when made; precision rules."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

import torch

from .lora import LoraSpec

from .chat_templates import NAMES as TEMPLATES

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw")
# BOS and "[INST]  [/INST]" alone take about 10 ids under LLaMA's tokenizer, and truncation keeps a quarter of
# max_len for the question: 64 leaves room for a short question and 48 tokens of answer. Below it an example is
# mostly markup, or BOS plus a stray answer token.
MIN_MAX_LEN = 64


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults follow the classic guanaco QLoRA recipe for Llama-2-7B."""

    output_dir: str = "out"  # checkpoints, metrics.jsonl, loss.png and the final adapter/ go here
    # --- data
    max_len: int = 1024  # tokens per example (at least 64); longer ones are truncated as encode_chat says
    batch_size: int = 4  # examples per micro-batch (per process, with several)
    grad_accum: int = 1  # micro-batches per optimizer step
    pack: bool = False  # micro-batches of batch_size x max_len tokens of whole examples: fewer steps, no padding
    skip_malformed: bool = False  # skip and count malformed rows instead of raising MalformedRow
    group_by_length: bool = True  # batch similar lengths together: less padding, same examples per epoch (unpacked)
    template: str = "auto"  # chat template: "auto" (the tokenizer's own, else llama2), "llama2", "llama3", "chatml"
    # --- length of the run
    epochs: float = 1.0  # passes over the training rows; ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps; overrides epochs
    # --- optimisation
    lr: float = 2e-4  # the peak learning rate
    schedule: str = "cosine"  # "cosine" (decay to 0) or "constant", both after linear warmup
    warmup_ratio: float = 0.03  # fraction of the steps spent warming up from 0 to lr
    weight_decay: float = 0.001  # AdamW's decoupled weight decay
    max_grad_norm: float = 0.3  # clip the global LoRA gradient norm to this
    optimizer: str = "adamw"  # "adamw" (torch), "adamw_8bit", "paged_adamw_8bit" or "paged_adamw" (bitsandbytes)
    seed: int = 42  # LoRA init, dropout and data order
    # --- LoRA, used when the model has none yet
    lora_r: int = 64  # the rank of each update
    lora_alpha: float = 16  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.1  # dropout on the LoRA branch's input
    targets: tuple = ("q_proj", "v_proj")  # the linear layers that get LoRA, by name
    use_rslora: bool = False  # scale the update by lora_alpha / sqrt(lora_r) (rsLoRA), not lora_alpha / lora_r
    use_dora: bool = False  # DoRA: learn a magnitude per output feature besides the low-rank update
    # --- precision and memory
    precision: str | None = None  # "bf16", "fp16" (GradScaler, fp32 LoRA weights) or "fp32"; None: by device
    memory_budget_gib: float | None = None  # GPU memory the run may use; None: what the card has free at start
    fast: bool = True  # minilora's decoder layers (kernels/layer.py); False: transformers' layers
    gradient_checkpointing: bool | None = None  # recompute layers in backward: True all, False none; None: the plan
    cuda_graphs: bool = True  # replay each batch shape's step as a CUDA graph where the plan allows it
    fsdp: bool = False  # several processes: shard the 4-bit base and LoRA weights over them (FSDP2, fsdp.py)
    # --- logging, evaluation, samples, checkpoints
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int | None = None  # steps between evaluations (and one at the end) when eval rows are given
    sample_every: int | None = None  # steps between greedy samples of sample_prompts (and at start and end)
    sample_prompts: tuple = ()  # user messages to answer greedily
    sample_max_new_tokens: int = 64  # the length of each sample's answer, at most
    save_every: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # this run's checkpoints kept; older ones are deleted
    resume: str | None = None  # continue the run in output_dir: "latest", or a checkpoint-STEP dir
    overwrite: bool = False  # replace the run in output_dir (its files are deleted); without it that is refused
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        check(self)

    def lora(self) -> LoraSpec:
        """The adapter these fields declare (train() adds it to a model without LoRA)."""
        return LoraSpec(self.lora_r, self.lora_alpha, self.lora_dropout, self.targets, use_rslora=self.use_rslora,
                        use_dora=self.use_dora)

    def fixed_plan(self) -> dict:
        """The memory plan's options that this config decides itself (choose_plan's `fixed`, which
        plan.plan_options reads); the plan chooses the rest."""
        fixed = {} if self.cuda_graphs else {"graphs": False}
        if self.gradient_checkpointing is not None:
            fixed["gradient_checkpointing"] = self.gradient_checkpointing
        return fixed


def check(cfg: TrainConfig):
    """Every field that can be checked without the model or the data, its type first; runs when a TrainConfig is
    made, and again in train()."""
    check_types(cfg)
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}; use one of {list(PRECISIONS)}, or None to pick by device")
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule={cfg.schedule!r}; use 'cosine' or 'constant'")
    if cfg.template not in TEMPLATES:
        raise ValueError(f"template={cfg.template!r}; use one of {list(TEMPLATES)} (auto: the tokenizer's own chat "
                         "template, else llama2)")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r}; use one of {list(OPTIMIZERS)}")
    # each condition holds for good values; NaN fails every comparison, so it is refused too
    counts = ("batch_size", "grad_accum", "log_every", "keep_last", "lora_r", "sample_max_new_tokens")
    rules = [(name, getattr(cfg, name) >= 1, "at least 1") for name in counts]
    rules += [(name, getattr(cfg, name) is None or getattr(cfg, name) >= 1, "at least 1, or None")
              for name in ("max_steps", "eval_every", "sample_every", "save_every")]
    rules += [("max_len", cfg.max_len >= MIN_MAX_LEN, f"at least {MIN_MAX_LEN}: the template's markup alone takes "
               "about 10 tokens, and an example needs room for a question and an answer"),
              ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "a positive number such as 2e-4"),
              ("epochs", math.isfinite(cfg.epochs) and cfg.epochs > 0, "a positive number"),
              ("max_grad_norm", cfg.max_grad_norm > 0, "positive"),
              ("lora_alpha", cfg.lora_alpha > 0, "positive"),
              ("weight_decay", cfg.weight_decay >= 0, "0 or more"),
              ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
              ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
              ("memory_budget_gib", cfg.memory_budget_gib is None or cfg.memory_budget_gib > 0, "positive, or None")]
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)} must be {rule}")
    if cfg.fsdp and (cfg.precision == "fp16" or cfg.optimizer != "adamw"):
        raise ValueError(f"fsdp=True trains with precision 'bf16' or 'fp32' and optimizer 'adamw'; this config has "
                         f"precision={cfg.precision!r}, optimizer={cfg.optimizer!r}")


def check_types(cfg: TrainConfig):
    """Each field's value against its annotation, so that the value checks compare numbers with numbers: one
    TypeError that names the field, the type and a value to pass. A list for a tuple field becomes a tuple."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
        if tuple in kinds and isinstance(value, list):
            setattr(cfg, f.name, tuple(value))
        if not any(_fits(getattr(cfg, f.name), kind) for kind in kinds):
            expected = " or ".join({tuple: "a tuple of str", type(None): "None"}.get(k, k.__name__) for k in kinds)
            example = _example(value, kinds, f.default)
            raise TypeError(f"{f.name}={value!r} must be {expected}; pass {f.name}={example!r}")


def _fits(value, kind: type) -> bool:
    """Whether value is of an annotation's type: a bool is no number, an int is a float, a tuple holds strings."""
    if kind is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _example(value, kinds: tuple, default):
    """A value to suggest: the one given, converted where it reads as one ("3" -> 3, 2.0 -> 2, "q_proj" ->
    ("q_proj",)), else the field's default."""
    if tuple in kinds and isinstance(value, str):
        return (value,)
    for kind in (k for k in kinds if k in (int, float) and not isinstance(value, bool)):
        try:
            if kind(value) == float(value):
                return kind(value)
        except (TypeError, ValueError, OverflowError):
            pass
    return default


def default_precision(device: torch.device | str) -> str:
    """bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on a CPU."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """Mixed precision for "bf16" and "fp16"; plain fp32 compute for "fp32"."""
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
