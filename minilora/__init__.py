"""minilora: compact, hand-rolled QLoRA fine-tuning of LLaMA 2."""

from .checkpoint import load_adapter, save_adapter
from .data import Collator, encode_chat, load_rows, render_chat
from .lora import LoRALinear, add_lora, lora_state_dict, mark_only_lora_trainable, merge_lora
from .model import load_model, load_tokenizer, prepare_for_training
from .plan import format_plan, plan_memory
from .train import TrainConfig, generate, train

__all__ = [
    "LoRALinear", "add_lora", "lora_state_dict", "mark_only_lora_trainable", "merge_lora",
    "load_model", "load_tokenizer", "prepare_for_training",
    "load_adapter", "save_adapter",
    "Collator", "encode_chat", "load_rows", "render_chat",
    "TrainConfig", "generate", "train",
    "format_plan", "plan_memory",
]
