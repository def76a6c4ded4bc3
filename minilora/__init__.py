"""minilora: compact, hand-rolled QLoRA fine-tuning of LLaMA 2."""

from .checkpoint import load_adapter, save_adapter
from .lora import LoRALinear, add_lora, lora_state_dict, mark_only_lora_trainable, merge_lora
from .model import load_model, load_tokenizer, prepare_for_training

__all__ = [
    "LoRALinear", "add_lora", "lora_state_dict", "mark_only_lora_trainable", "merge_lora",
    "load_model", "load_tokenizer", "prepare_for_training",
    "load_adapter", "save_adapter",
]
