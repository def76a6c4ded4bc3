"""Speed paths for training, each tested for equality with the plain path."""

from .layer import FastLayer, layer_forward
from .lora4bit import Projection, ProjectFn

__all__ = ["FastLayer", "layer_forward", "Projection", "ProjectFn"]
