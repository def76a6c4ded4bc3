"""Adapter files in PEFT's format, and training checkpoints that are written atomically and load safely.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with keys such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, so PEFT loads it and minilora loads PEFT's.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .lora import add_lora, lora_layers, lora_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class CorruptFile(ValueError):
    """An adapter or training-state file that cannot be read back: truncated, or not what its name says."""


def adapter_config(model: torch.nn.Module) -> dict:
    """The PEFT `LoraConfig` fields that describe the model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; call minilora.add_lora(model, ...) first")
    settings = {(m.r, m.alpha, m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers with different (r, alpha, dropout) {sorted(settings)} cannot share one adapter config")
    (r, alpha, dropout), = settings
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model: torch.nn.Module, out_dir: str) -> str:
    """Write the LoRA weights and config in PEFT's format into `out_dir` (atomically); returns out_dir."""
    atomic_dir(out_dir, lambda tmp: _write_adapter(model, tmp))
    return out_dir


def _write_adapter(model, out_dir: str):
    config = adapter_config(model)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """Load an adapter saved by minilora or PEFT. Adds the LoRA layers first if the model has none.

    Raises on missing, unexpected or mis-shaped keys: a silently half-loaded adapter is the base model.
    Every check runs before a weight is copied, and LoRA layers added here are removed again when one fails,
    so a failed load leaves the model as it was.
    """
    config_path, weights_path = os.path.join(adapter_dir, CONFIG_NAME), os.path.join(adapter_dir, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path) as f:
            config = json.load(f)
        state = load_file(weights_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CorruptFile(f"the adapter in {adapter_dir} is corrupt ({e}); save it again") from e
    _check_supported(config, adapter_dir)
    added, trainable = not lora_layers(model), {p: p.requires_grad for p in model.parameters()}
    try:
        if added:
            targets = config["target_modules"]
            add_lora(model, targets=[targets] if isinstance(targets, str) else targets,
                     r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0))
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
            param.copy_(value)
    return model


def _matched_weights(model, state: dict, config: dict, adapter_dir: str) -> list[tuple]:
    """[(the model's LoRA weight, the file's tensor for it)], once every tensor is known to fit one to one."""
    if {m.scaling for m in lora_layers(model).values()} != {config["lora_alpha"] / config["r"]}:
        raise ValueError(f"the model's LoRA scaling differs from the adapter's alpha/r = {config['lora_alpha']}/{config['r']}")
    own = lora_state_dict(model)
    state = {k.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight"): v for k, v in state.items()}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the adapter in {adapter_dir} does not fit this model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; "
            "load it onto the base model it was trained on"
        )
    return [(param, state[k]) for k, param in own.items()]


def _check_supported(config: dict, where: str):
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r}")
    for key in ("use_rslora", "use_dora"):
        if config.get(key):
            problems.append(f"{key}=true")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):  # per-layer ranks, scalings or layer subsets: one (r, alpha) cannot describe them
            problems.append(f"{key}={config[key]}")
    if problems or "r" not in config or "lora_alpha" not in config or "target_modules" not in config:
        raise ValueError(f"unsupported adapter config in {where}: {problems or 'missing r, lora_alpha or target_modules'}; "
                         "minilora loads plain LoRA adapters (bias 'none', one r and alpha, no rsLoRA/DoRA, no modules_to_save)")


def atomic_dir(out_dir: str, write) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to out_dir, so a crash never leaves a half-written out_dir."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(out_dir):  # replace an existing dir: move it aside, move the new one in, delete the old
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


STATE_NAME = "training_state.pt"
STATE_KEYS = {"step", "optimizer", "scheduler", "scaler", "rng_cpu", "rng_cuda"}  # what save_checkpoint writes


def save_checkpoint(model, output_dir: str, step: int, optimizer, scheduler, scaler, keep_last: int = 2,
                    rank: int = 0, world: int = 1) -> str:
    """Write output_dir/checkpoint-STEP/: the adapter plus everything needed to resume bit-exactly.

    The directory appears only when complete (atomic_dir), so a crash mid-save leaves the previous one.
    Data-parallel (world > 1): every process must call it; process 0 writes, with every process's RNG states.
    """
    path = os.path.join(output_dir, f"checkpoint-{step}")
    rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    ranks = None
    if world > 1:
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, (rng_cpu, rng_cuda))
        if rank:
            return path
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": rng_cpu,
        "rng_cuda": rng_cuda,
        **({"rng_ranks": ranks} if ranks else {}),  # [(cpu, cuda)] per process, 0 first
    }

    def write(tmp):
        _write_adapter(model, tmp)
        torch.save(state, os.path.join(tmp, STATE_NAME))

    atomic_dir(path, write)
    for old in _checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_training_state(model, path: str, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """Restore the adapter, optimizer, schedule, scaler and RNGs from a checkpoint dir; return its step.

    torch.load(weights_only=True) reads tensors and plain containers only, so a checkpoint from elsewhere
    cannot run code. A file that cannot be read raises CorruptFile, naming it, before anything is restored.
    """
    state_path = os.path.join(path, STATE_NAME)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path} is not a minilora checkpoint (no {STATE_NAME}); pass a checkpoint-STEP dir")
    with open(state_path, "rb") as f:  # so that what fails below is the file's content, not access to it
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # RuntimeError, OSError, EOFError or UnpicklingError, as the damage falls
            state = None  # torch's own message may suggest weights_only=False, which lets a file run code
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise CorruptFile(f"{state_path} cannot be read back: it is truncated or corrupt")
    written_by = len(state.get("rng_ranks") or [None])
    if written_by != world:
        raise ValueError(f"{path} was written by {written_by} data-parallel process(es); resume it with as many "
                         f"(this run has {world}), e.g. torchrun --nproc-per-node {written_by}")
    load_adapter(model, path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng_cpu, rng_cuda = state["rng_ranks"][rank] if world > 1 else (state["rng_cpu"], state["rng_cuda"])
    torch.set_rng_state(rng_cpu)
    if rng_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng_cuda)
    return state["step"]


def resume_latest(model, output_dir: str, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> int:
    """load_training_state from the newest checkpoint in output_dir that reads back; return its step, or 0.

    A corrupt checkpoint (a file cut short by a full disk, say) is named and the one before it is tried.
    """
    found = _checkpoints(output_dir)
    for path in reversed(found):
        try:
            return load_training_state(model, path, optimizer, scheduler, scaler, rank, world)
        except CorruptFile as e:
            if not rank:
                print(f"resume='latest': {e}; trying the checkpoint before it")
    if not rank:
        print(f"resume='latest': no {'readable ' if found else ''}checkpoint in {output_dir}, starting from step 0")
    return 0


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-STEP dir in output_dir, or None."""
    found = _checkpoints(output_dir)
    return found[-1] if found else None


def _checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]  # skips .tmp-/.old- leftovers
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in sorted(steps)]
