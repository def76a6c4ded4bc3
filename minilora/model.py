"""Loading a causal LM (LLaMA 2 and its family) with 4-bit linears, its tokenizer, and preparing it for LoRA
training."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .data import looks_local
from .kernels.attention import ATTENTION_BACKENDS
from .kernels.layer import FastLayer, attach_fast, detach_fast, fast_layer, unsupported
from .kernels.stream import stream_weights, unstream
from .lora import mark_only_lora_trainable, merge_lora
from .plan import PlanOptions, plan_options

QUANT_TYPES = ("nf4", "fp4")


def _must_exist(name_or_dir: str, what: str):
    """A path that is missing gets this message, not transformers' "Repo id must be in the form ..."."""
    if looks_local(name_or_dir) and not os.path.exists(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir!r} does not exist; pass a {what} dir or a hub id like owner/name")


def load_tokenizer(name_or_dir: str):
    """Load a tokenizer from a hub id, a `tokenizer.json` dir, or a dir holding only a sentencepiece
    `tokenizer.model` (LLaMA 2's).

    transformers can build a 3-token tokenizer from a sentencepiece file it failed to read, and that
    tokenizer encodes everything to `[]` without complaint, so the result is checked before it is returned.
    """
    _must_exist(name_or_dir, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except (ImportError, ValueError, OSError) as e:  # transformers' own message can blame an unrelated format
        raise ValueError(f"could not load a tokenizer from {name_or_dir!r}: {str(e).splitlines()[0]}; a LLaMA "
                         "tokenizer is a dir or hub id with tokenizer.json, or with a sentencepiece tokenizer.model "
                         "(needs sentencepiece and protobuf)") from e
    probe = tok.encode("hello world", add_special_tokens=False)
    if len(tok) <= 3 or not probe:
        raise ValueError(f"the tokenizer loaded from {name_or_dir!r} is broken: {len(tok)} tokens, 'hello world' -> "
                         f"{probe}; check that tokenizer.model is a sentencepiece model and that sentencepiece and "
                         "protobuf are installed")
    if tok.eos_token_id is None:  # (a BOS is the llama2 template's to ask for: Qwen2's tokenizers have none)
        raise ValueError(f"the tokenizer loaded from {name_or_dir!r} has no eos_token_id; a causal LM's tokenizer "
                         "needs one (LLaMA 2's is 2)")
    if tok.pad_token_id is None:
        # LLaMA 2 and 3 ship without a pad token. unk (where there is one) is never a label, so padding with it
        # cannot be confused with a real EOS; the collator masks padding by position anyway.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_config(name_or_dir: str):
    """The checkpoint's config, read before any weight: a model that is no causal LM is refused here."""
    _must_exist(name_or_dir, "checkpoint")
    config = AutoConfig.from_pretrained(name_or_dir)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        found = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
        raise ValueError(f"{name_or_dir!r} holds a {config.model_type!r} model ({found}), which transformers cannot "
                         "load as a causal LM (AutoModelForCausalLM); minilora trains causal LMs such as LLaMA, "
                         "Mistral and Qwen2")
    return config


def load_model(name_or_dir: str, quant: str | None = "nf4", double_quant: bool = True,
               compute_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
               tokenizer=None, config=None):
    """Return `(model, tokenizer)`: transformers' causal LM for the checkpoint (`LlamaForCausalLM` for LLaMA 2 and
    3, `MistralForCausalLM`, `Qwen2ForCausalLM`, ...) whose linears are bitsandbytes 4-bit layers.

    quant: "nf4" or "fp4" (4-bit, the QLoRA recipe), or None for plain `compute_dtype` weights.
    device: "cuda", "cpu", ...; defaults to cuda when available. tokenizer: a dir or hub id (default:
    `name_or_dir`), or one already loaded. config: load_config's result, when the caller has read it already.
    The config and the tokenizer are checked before any weight is built.
    """
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"unknown quant={quant!r}; use one of {QUANT_TYPES} or None for no quantization")
    config = config or load_config(name_or_dir)
    tok = load_tokenizer(tokenizer or name_or_dir) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantization = None if quant is None else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(name_or_dir, config=config, dtype=compute_dtype,
                                                 device_map={"": device}, attn_implementation="sdpa",
                                                 quantization_config=quantization)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bnb would repack 4-bit weights at the first CPU eval forward and then compute in bf16; keeping
            # the standard path makes eval and train numerics identical and the weights readable for merging.
            module.support_avx512bf16_for_cpu = False
    return model, tok


def prepare_for_training(model: torch.nn.Module, options: PlanOptions | None = None, **fields):
    """Freeze everything but LoRA and make each decoder layer train as `options` says; returns the model.

    options: a PlanOptions (choose_plan's), or its fields by name (gradient_checkpointing=True for every layer,
    False for none, a number for the first that many; offload=True; fast=True; ...). Without either:
    transformers' layers, every one checkpointed.
    Embeddings and lm_head keep their dtype: upcasting them to fp32 costs memory and buys nothing.
    - A checkpointed layer keeps only its input; the backward recomputes the rest. transformers' layers use
      non-reentrant checkpointing, which needs no `requires_grad` on the layer inputs, so a frozen embedding
      needs no input-grad hook (the reentrant form does, and has been measured 2x slower); a fast layer is one
      autograd node of its own (kernels/layer.py, Recomputed).
    - offload: a checkpointed layer's saved input waits in pinned CPU memory. A fast layer then checkpoints its
      halves, with inputs copied on a side stream and fetched one unit ahead (kernels/offload.py), and
      dequantizes its projections' weights one member at a time.
    - The embedding table waits in pinned host memory where options.host_embedding says; each batch's rows are
      gathered on the host and copied (kernels.offload.embed). Generation and transformers' forward need it on the
      device: `place_embedding` moves it.
    - stream: every layer's 4-bit weights wait in pinned host memory and are copied to the GPU a few layers ahead
      of their use (kernels/stream.py): a model whose weights do not fit the card trains on it. It needs fast
      layers, every one checkpointed, none cached; the weights stay streamed until a call without stream.
    - fast: minilora's loss runs the decoder through kernels/layer.py, the same weights and formula in fewer
      kernels (cached_layers keep their dequantized weights for the run; keep_weights: a recompute keeps them
      for the backward). transformers' forward stays for everything else (generation, a direct model(...)).
    """
    options = plan_options(options or PlanOptions(fast=False), **fields)
    if options.fast and (why := unsupported(model)):
        raise ValueError(f"fast layers cannot train this model: {why}; use fast=False")
    mark_only_lora_trainable(model)
    model.config.use_cache = False  # a KV cache is useless in training and would be rebuilt on recompute
    layers = decoder_layers(model)
    n = options.layers_checkpointed(len(layers))
    on_host = options.host_embedding(len(layers), tied=model.get_input_embeddings().weight is model.lm_head.weight)
    place_embedding(model, "cpu" if on_host and model.lm_head.weight.is_cuda else None)
    detach_fast(model)
    if options.stream and (not options.fast or n < len(layers) or options.cached_layers):
        raise ValueError("stream=True needs fast=True, every layer checkpointed and no cached_layers")
    if not options.stream:
        unstream(layers)  # weights an earlier call streamed come back to the device
    for i, layer in enumerate(layers):
        layer.__dict__.pop("forward", None)  # undo an earlier call: back to the class's forward
        if options.fast:
            attach_fast(layer, FastLayer(layer, cache=i < options.cached_layers, checkpoint=i < n,
                                         keep_weights=options.keep_weights and i < n, offload=options.offload))
        elif i < n:
            # SDPA restricted to flash, memory-efficient and math attention (see kernels/layer.py), the recompute too
            train_forward = sdpa_kernel(ATTENTION_BACKENDS)(layer.forward)
            layer.forward = functools.partial(_layer_forward, layer.forward, train_forward, options.offload)
    if options.stream:
        if not all(p.quantized for layer in layers for p in fast_layer(layer).projections()):
            raise ValueError("stream=True streams 4-bit weights: load the model with quant='nf4'")
        stream_weights(layers, model.lm_head.weight.device)
    return model


def place_embedding(model: torch.nn.Module, device=None):
    """Move the input embedding table to `device` ("cpu": pinned host memory), or None: beside lm_head."""
    w = model.get_input_embeddings().weight
    device = torch.device(device) if device is not None else model.lm_head.weight.device
    if w.device != device:
        w.data = w.data.to(device).pin_memory() if device.type == "cpu" else w.data.to(device)


def _layer_forward(eager, train_forward, offload: bool, *args, **kwargs):
    """One checkpointed transformers decoder layer. With grads on: train_forward (its own SDPA backends),
    checkpointed. Without grads (evaluation, generation with a KV cache): eager, which keeps nothing anyway."""
    if not torch.is_grad_enabled():
        return eager(*args, **kwargs)
    # The inputs are saved through autograd's saved-tensor hooks, so save_on_cpu moves just them; the
    # layer's inner activations are never saved at all.
    pin = offload and torch.cuda.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin) if offload else contextlib.nullcontext():
        return checkpoint(train_forward, *args, use_reentrant=False, **kwargs)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the list of config.num_hidden_layers modules in its base model (model.layers in
    LLaMA's family, transformer.h in GPT-2's)."""
    n = model.config.num_hidden_layers
    found = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"found no list of {n} decoder layers in the {type(model).__name__}")
    return found[0]


def meta_model(config) -> torch.nn.Module:
    """The causal LM that `config` describes, on the meta device: its structure, with no memory and no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_names(model: torch.nn.Module) -> list[str]:
    """The names of the model's linear layers (a meta_model's too)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def save_merged(model: torch.nn.Module, tokenizer, out_dir: str) -> str:
    """Fold the LoRA updates into the weights (merge_lora) and write an ordinary HF checkpoint with its tokenizer
    to out_dir, which `load_model(out_dir)` and examples/chat.py then load alone; returns out_dir."""
    merge_lora(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
