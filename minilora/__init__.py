"""minilora: compact, hand-rolled QLoRA fine-tuning of LLaMA 2."""

import logging

# bitsandbytes asks the hub for a kernel at import on CPUs with AVX512-BF16, and logs a failure when the optional
# `kernels` package cannot give it; `kernels` itself says, offline, that it skips its publisher check. The kernel
# only speeds up bnb's packed CPU inference path, which has a built-in fallback and which minilora turns off
# (model.load_model), so both lines are noise on every run. The filters drop those messages and nothing else; they
# must be in place before bitsandbytes is first imported (by .adapter, through .lora).
_BNB_KERNEL = "kernels-community/quantization-bitsandbytes"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith(f"Skipping publisher trust check for '{_BNB_KERNEL}'"))

from .adapter import load_adapter, save_adapter  # noqa: E402
from .checkpoint import CheckpointWriteError, ResumeMismatch  # noqa: E402
from .data import Collator, load_rows, split_eval  # noqa: E402
from .loss import causal_lm_loss  # noqa: E402
from .lora import LoRALinear, LoraSpec, add_lora, lora_state_dict, mark_only_lora_trainable, merge_lora  # noqa: E402
from .model import load_model, load_tokenizer, prepare_for_training, save_merged  # noqa: E402
from .rundir import RunDirError  # noqa: E402
from .plan import PlanOptions, Setup, format_plan, plan_memory  # noqa: E402
from .plan_choice import choose_plan  # noqa: E402
from .chat_templates import NAMES as TEMPLATES, PieceTemplate, Special, Template, Text  # noqa: E402
from .conversation import MalformedRow  # noqa: E402
from .template import encode_chat, encode_prompt, encode_rows, get_template, render_chat  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .generate import generate  # noqa: E402
from .loop import train  # noqa: E402
from .stop import Interrupted  # noqa: E402

__all__ = [
    "LoRALinear", "LoraSpec", "add_lora", "lora_state_dict", "mark_only_lora_trainable", "merge_lora",
    "load_model", "load_tokenizer", "prepare_for_training", "save_merged",
    "load_adapter", "save_adapter", "CheckpointWriteError", "ResumeMismatch", "RunDirError",
    "Collator", "MalformedRow", "encode_chat", "encode_prompt", "encode_rows", "load_rows", "render_chat",
    "split_eval", "TEMPLATES", "Template", "PieceTemplate", "Special", "Text", "get_template",
    "Interrupted", "TrainConfig", "causal_lm_loss", "generate", "train",
    "PlanOptions", "Setup", "choose_plan", "format_plan", "plan_memory",
]
