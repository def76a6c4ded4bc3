"""Optional speed paths for training, each off by default and tested for equality with the plain path."""

from .lora4bit import LoRALinearFunction, fused_lora_linear

__all__ = ["LoRALinearFunction", "fused_lora_linear"]
