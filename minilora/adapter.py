"""Adapter files in PEFT's format, each written atomically, and loaded all or nothing.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so PEFT loads it and minilora loads PEFT's.
train() adds `minilora_template.json`, the chat template it trained under, which examples/chat.py then answers in.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch.distributed.tensor import DTensor, distribute_tensor

from .lora import LoraSpec, add_lora, is_merged, lora_layers, lora_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TEMPLATE_NAME = "minilora_template.json"  # {"template": the chat template's name the weights were trained under}
PEFT_PREFIX = "base_model.model."


class CorruptFile(ValueError):
    """An adapter or training-state file that cannot be read back: truncated, or not what its name says."""


def model_lora(model: torch.nn.Module) -> LoraSpec | None:
    """The settings of the model's adapter, its targets included, or None when it has no LoRA layers yet. Layers
    of different settings cannot make one adapter, and are refused."""
    layers = lora_layers(model)
    if not layers:
        return None
    specs = {m.spec for m in layers.values()}
    if len(specs) > 1:
        raise ValueError(f"LoRA layers with different settings {sorted(map(str, specs))} cannot make one adapter")
    return dataclasses.replace(specs.pop(), targets=tuple(sorted({name.rsplit(".", 1)[-1] for name in layers})))


def adapter_config(model: torch.nn.Module) -> dict:
    """The PEFT `LoraConfig` fields that describe the model's LoRA layers."""
    spec = model_lora(model)
    if spec is None:
        raise ValueError("the model has no LoRA layers to save; call minilora.add_lora(model, ...) first")
    return {**spec.peft_config(), "base_model_name_or_path": getattr(model, "name_or_path", None) or None}


def trains_own_adapter(model: torch.nn.Module, wanted: LoraSpec) -> bool:
    """Whether train() trains the adapter the model carries (True) or adds a fresh one (False), given the LoRA
    settings of its TrainConfig. The model's adapter must have those settings (its weights' dtype may be its own);
    a merged model is refused: an adapter trained on merged weights would not reproduce the trained model on the
    base it names."""
    if is_merged(model):
        raise ValueError("the model's LoRA was merged into its weights (merge_lora), so an adapter trained on it "
                         "would not apply to its base model; load the base model again to train a new adapter, or "
                         "save the merged model (save_merged) and load it as a new base")
    have = model_lora(model)
    wanted = dataclasses.replace(wanted, targets=tuple(sorted(set(wanted.targets))))
    if have is not None and dataclasses.replace(have, dtype=wanted.dtype) != wanted:
        raise ValueError(f"the model already carries LoRA ({_as_fields(have)}), and this TrainConfig asks for "
                         f"{_as_fields(wanted)}; give the TrainConfig the model's settings to train its adapter on, "
                         "or load the model again for a fresh adapter")
    return have is not None


def _as_fields(spec: LoraSpec) -> str:
    """LoRA settings as TrainConfig's fields."""
    return (f"lora_r={spec.r}, lora_alpha={spec.alpha}, lora_dropout={spec.dropout}, targets={spec.targets}"
            + "".join(f", {k}=True" for k in ("use_rslora", "use_dora") if getattr(spec, k)))


def save_adapter(model: torch.nn.Module, out_dir: str, weights: dict | None = None, template: str | None = None
                 ) -> str:
    """Write the LoRA weights and config in PEFT's format into `out_dir`; returns out_dir.

    Only the adapter's files are written, each to a temporary file that is then renamed over its name, so a
    crash leaves the old file or the new one, never half of one; nothing else in out_dir is touched.
    weights: the LoRA tensors to write, keyed as lora_state_dict's (a sharded model's, gathered: fsdp.py);
    None: the model's own. template: the name of the chat template the adapter was trained under (a Template's
    `name`), recorded for saved_template; without it, an earlier record in out_dir is removed.
    """
    config = adapter_config(model)  # a model without LoRA fails here, before anything is written
    weights = lora_state_dict(model) if weights is None else weights
    if any(isinstance(v, DTensor) for v in weights.values()):
        raise ValueError("the model is sharded (fsdp=True), and each process holds a part of every LoRA weight: "
                         "pass weights=minilora.fsdp.full_lora_weights(model), which every process must call, "
                         "and save on process 0")
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in weights.items()}
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} is a file; save_adapter writes a directory, so pass another path")
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    write_atomic(os.path.join(out_dir, CONFIG_NAME), json.dumps(config, indent=2).encode())
    if template is not None:
        save_template(out_dir, template)
    elif os.path.exists(os.path.join(out_dir, TEMPLATE_NAME)):  # an earlier adapter's record, not these weights'
        os.remove(os.path.join(out_dir, TEMPLATE_NAME))
    return out_dir


def save_template(out_dir: str, template: str):
    """Record in out_dir (an adapter's, or a merged model's) the name of the chat template its weights were
    trained under."""
    write_atomic(os.path.join(out_dir, TEMPLATE_NAME), json.dumps({"template": template}).encode())


def saved_template(model_dir: str) -> str | None:
    """The chat template's name recorded in an adapter's or a merged model's directory (save_template): a built-in
    ("llama2", "llama3", "chatml"), or "jinja:<hash>" for the tokenizer's own; None where there is no record
    (PEFT's adapters, hub ids)."""
    path = os.path.join(model_dir, TEMPLATE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            name = json.load(f)["template"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFile(f"{path} is corrupt ({e!r}); delete it and name the chat template yourself") from e
    if not isinstance(name, str):
        raise CorruptFile(f"{path} names the template {name!r}; delete it and name the chat template yourself")
    return name


def write_atomic(path: str, data):
    """Write `data` (bytes, or a function that writes to a binary file) to path through a temporary file beside
    it and a rename: path holds its old content or all of the new, never part of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # Python's own file: a full disk is an OSError with errno ENOSPC
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_adapter(model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """Load an adapter saved by minilora or PEFT. Adds the LoRA layers first if the model has none.

    Raises on missing, unexpected or mis-shaped keys: a silently half-loaded adapter is the base model.
    Every check runs before a weight is copied, and LoRA layers added here are removed again when one fails,
    so a failed load leaves the model as it was.
    """
    config = check_adapter(adapter_dir)
    try:
        state = load_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise CorruptFile(f"the adapter in {adapter_dir} is corrupt ({e}); save it again") from e
    added, trainable = not lora_layers(model), {p: p.requires_grad for p in model.parameters()}
    try:
        if added:
            add_lora(model, **dataclasses.asdict(LoraSpec.from_peft(config)))
        pairs = _matched_weights(model, state, config, adapter_dir)
    except Exception:
        if added:  # undo add_lora: the base linears back in place, requires_grad as it was
            for name, layer in lora_layers(model).items():
                model.set_submodule(name, layer.base)
            for p, flag in trainable.items():
                p.requires_grad_(flag)
        raise
    with torch.no_grad():
        for param, value in pairs:
            if isinstance(param, DTensor):  # a sharded model's (fsdp.py): each process takes its shard
                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            param.copy_(value)
    return model


def check_adapter(adapter_dir: str) -> dict:
    """The adapter config in adapter_dir, once both adapter files are there and the config is one minilora
    loads; raises FileNotFoundError, CorruptFile or ValueError saying what is wrong. Reads no weights."""
    config_path, weights_path = os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, OSError) as e:
        raise CorruptFile(f"the adapter in {adapter_dir} is corrupt ({e}); save it again") from e
    problems = [f"peft_type={config.get('peft_type')!r}"] if config.get("peft_type", "LORA") != "LORA" else []
    problems += [f"bias={config['bias']!r}"] if config.get("bias", "none") != "none" else []
    # modules_to_save, or per-layer ranks, scalings or layer subsets: one (r, alpha) cannot describe them
    keys = ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")
    problems += [f"{key}={config[key]}" for key in keys if config.get(key)]
    if problems or not {"r", "lora_alpha", "target_modules"} <= config.keys():
        raise ValueError(f"unsupported adapter config in {adapter_dir}: "
                         f"{problems or 'missing r, lora_alpha or target_modules'}; minilora loads LoRA adapters "
                         "(rsLoRA and DoRA too) with bias 'none', one r and alpha and no modules_to_save")
    return config


def _matched_weights(model, state: dict, config: dict, adapter_dir: str) -> list[tuple]:
    """[(the model's LoRA weight, the file's tensor for it)], once every tensor is known to fit one to one."""
    have, theirs = model_lora(model), LoraSpec.from_peft(config)
    if (have.scaling, have.use_dora) != (theirs.scaling, theirs.use_dora):
        raise ValueError(f"the model's LoRA ({_as_fields(have)}) differs in its scaling or DoRA from the adapter's "
                         f"({_as_fields(theirs)}); load the adapter onto a model without LoRA")
    own = lora_state_dict(model)
    state = {k.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight"): v for k, v in state.items()}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the adapter in {adapter_dir} does not fit this model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; "
            "load it onto the base model it was trained on")
    return [(param, state[k]) for k, param in own.items()]
