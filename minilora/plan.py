"""Predict the peak GPU memory of one minilora QLoRA training step before loading anything (plan_choice.py then
chooses the fastest way to train that fits a memory budget).

The peak is what `torch.cuda.max_memory_allocated` reports: persistent tensors (4-bit weights, adapters, optimizer
state, weights kept dequantized, grads and inputs of CUDA-graph steps) plus the larger of two transient moments
of a step:
  "loss"      the chunked cross-entropy's forward, with every layer's activations still held;
  "backward"  the backward of the last decoder layer (the first one recomputed if it is checkpointed), with
              every other layer's activations still held.
The CUDA context (~0.5 GiB) and a paged optimizer's paged states live outside PyTorch's counters; they are
reported beside the total, not in it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .config import OPTIMIZERS
from .kernels.attention import KEEP_ATTENTION
from .kernels.stream import SLOTS
from .lora import LoraSpec
from .plan_layers import StepSizes, fast_layer_bytes, hf_layer_bytes, linear_shapes, optimizer_bytes

GiB = 2**30
CUBLAS_WORKSPACES = 2 * 32 * 2**20  # cuBLAS keeps a 32 MiB workspace per (thread, stream): forward + autograd thread
CUDA_CONTEXT = 512 * 2**20  # driver context + kernels; seen by nvidia-smi, not by torch's allocator counters
LOSS_CHUNKS = (4096, 2048, 1024, 512)  # supervised rows per vocabulary chunk that choose_plan tries, largest first


@dataclass(frozen=True)
class PlanOptions:
    """How the decoder trains: the memory plan's choices. choose_plan returns one; prepare_for_training applies
    it and plan_memory predicts its peak."""

    fast: bool = True  # minilora's decoder layers (kernels/layer.py); False: transformers'
    checkpointed: int | None = None  # the first this many layers are checkpointed (recomputed); None: all
    offload: bool = False  # checkpointed inputs in pinned host memory, copied on side streams
    cached_layers: int = 0  # the first this many layers keep their weights dequantized for the whole run (fast)
    keep_weights: bool = False  # a checkpointed layer's recompute keeps its dequantized weights for the backward
    embedding_on_host: bool | None = None  # the embedding table in pinned host memory; None: in the lean mode
    loss_chunk: int = 4096  # supervised rows per chunk of the vocabulary projection
    graphs: bool = True  # fast steps replayed as CUDA graphs (on a GPU), which keep their inputs and LoRA grads
    stream: bool = False  # the layers' 4-bit weights in pinned host memory, copied in as they run (kernels/stream.py)

    def layers_checkpointed(self, num_layers: int) -> int:
        return num_layers if self.checkpointed is None else min(self.checkpointed, num_layers)

    def host_embedding(self, num_layers: int, tied: bool = False) -> bool:
        """Whether the embedding table waits in host memory: by default in the lean mode (fast layers that
        offload their checkpoints), never when it is lm_head's weight too."""
        if tied:
            return False
        if self.embedding_on_host is not None:
            return self.embedding_on_host
        return self.fast and self.offload and self.layers_checkpointed(num_layers) > 0


# plan_memory's keywords for the adapter's settings (Setup.lora, a LoraSpec), by the LoraSpec field each sets
LORA_FIELDS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets",
               "lora_dtype": "dtype", "use_rslora": "use_rslora", "use_dora": "use_dora"}


@dataclass(frozen=True)
class Setup:
    """What the plan takes as given: the base's quantization and precision, the adapter, the optimizer."""

    lora: LoraSpec = LoraSpec()  # the adapter: its rank, targets, dropout, weights' dtype, DoRA
    quant: str | None = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    optimizer: str = "adamw"
    data_parallel: bool = False  # in a process group: the all-reduced LoRA grads live through the run


def plan_options(options: PlanOptions | None = None, gradient_checkpointing: bool | int | None = None,
                 **fields) -> PlanOptions:
    """options with `fields` changed. gradient_checkpointing (True: every layer, False: none, or a number of
    layers) is read here, once, as `checkpointed`."""
    if gradient_checkpointing is not None:
        fields["checkpointed"] = None if gradient_checkpointing is True else int(gradient_checkpointing)
    return dataclasses.replace(options or PlanOptions(), **fields)


def split_fields(options, setup, fields) -> tuple[PlanOptions, Setup]:
    """plan_memory's and choose_plan's keyword arguments, each to its dataclass (the adapter's, LORA_FIELDS, to
    Setup.lora)."""
    names = {f.name for f in dataclasses.fields(Setup)}
    setup = setup or Setup()
    lora = {LORA_FIELDS[k]: v for k, v in fields.items() if k in LORA_FIELDS}
    if "dtype" in lora:
        lora["dtype"] = lora["dtype"] or torch.float32  # add_lora's default
    setup = dataclasses.replace(setup, lora=dataclasses.replace(setup.lora, **lora),
                                **{k: v for k, v in fields.items() if k in names})
    rest = {k: v for k, v in fields.items() if k not in names and k not in LORA_FIELDS}
    return plan_options(options, **rest), setup


def as_config(config):
    """A model config as attributes: a LlamaConfig (or anything with its fields) as it is, a dict wrapped."""
    return SimpleNamespace(**config) if isinstance(config, dict) else config


def plan_memory(config, batch, seq_len, options: PlanOptions | None = None, setup: Setup | None = None, **fields):
    """Peak allocated bytes of a step of `minilora.train()`'s loop (labels on every token), itemised.

    config: a LlamaConfig, a dict or anything with its fields. options: how the decoder trains (PlanOptions;
    transformers' layers, every one checkpointed, when not given); setup: the base and the adapter (Setup).
    fields: any of either's fields by name, e.g. lora_r=16, offload=True, or gradient_checkpointing=True.
    Returns a dict: `breakdown` {term: bytes}, `total` (their sum, the predicted peak), `phase` (the moment
    it happens), `phases` (both candidates' transient bytes), `cpu` (pinned host bytes: offloaded inputs, a host
    embedding table, streamed weights), `streamed_host` and `streamed_per_step` (the streamed weights' host bytes,
    and the bytes a training step copies of them),
    `cuda_context` and `paged_optimizer` (outside `total`) and `inputs`.
    """
    c = as_config(config)
    options, setup = split_fields(options or PlanOptions(fast=False), setup, fields)
    z = _sizes(c, batch, seq_len, setup)
    step = _Step(z, options, quantized=setup.quant is not None)
    tied = getattr(c, "tie_word_embeddings", False)
    host_table = options.host_embedding(z.L, tied)
    stream = options.stream and setup.quant is not None
    b = _persistent(z, setup, step.cached, tied, host_table, stream)
    # a paged optimizer's paged states are CUDA managed memory, which torch's counters never see: the GPU holds
    # them while it has room (bitsandbytes prefetches them there for each update) and the driver may migrate them
    # to the host when it has not, so they are reported beside the total
    b["optimizer"], paged = optimizer_bytes(z, setup.optimizer)
    graphs = options.fast and options.graphs
    if graphs and host_table:  # CUDA graphs' own copy of the embedded rows (kernels/graphs.py)
        b["graph_inputs"] = z.S * z.H * z.dt
    moments = step.moments(options.loss_chunk)
    # the grads of CUDA-graph steps (fast layers), or of data-parallel ones (one flat all-reduced buffer), live
    # through the run
    kept_grads = z.lora_bytes if graphs or setup.data_parallel else 0
    phase = max(moments, key=lambda k: sum(moments[k]) + (kept_grads if k == "loss" else 0))
    phases = {k: extra for k, (_, extra) in moments.items()}
    b["activations"], extra = moments[phase]
    b["lora_grads"] = z.lora_bytes if phase == "backward" else kept_grads
    b["layer_backward"] = extra - z.lora_bytes if phase == "backward" else 0
    b["loss"] = extra if phase == "loss" else 0
    # Streamed: every layer's codes and scales in pinned host memory; a step copies each layer in for the forward,
    # and again for the backward but the last SLOTS, which the forward leaves on the device.
    streamed = z.L * sum(layer_4bit_bytes(z, setup.double_quant)[:2]) if stream else 0
    plan = {"breakdown": b, "total": sum(b.values()), "phase": phase, "phases": phases,
            "cpu": step.cpu(host_table) + streamed, "streamed_host": streamed,
            "streamed_per_step": streamed * (2 * z.L - min(SLOTS, z.L)) // z.L,
            "cuda_context": CUDA_CONTEXT, "paged_optimizer": paged,
            "inputs": dict(batch=batch, seq_len=seq_len, lora_r=setup.lora.r, lora_targets=z.targets,
                           quant=setup.quant, offload=options.offload, lora_dropout=setup.lora.dropout,
                           use_dora=setup.lora.use_dora,
                           fast=options.fast, checkpointed=step.ckpt, cached_layers=step.cached,
                           keep_weights=options.keep_weights, loss_chunk=options.loss_chunk, layers=z.L,
                           embedding_on_host=host_table, graphs=graphs, optimizer=setup.optimizer, stream=stream)}
    return plan


def _sizes(c, batch, seq_len, setup: Setup) -> StepSizes:
    """The step's sizes, from the config, the batch and the adapter; an unknown optimizer or target refused."""
    if setup.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer={setup.optimizer!r}; plan_memory knows {list(OPTIMIZERS)}")
    lin = linear_shapes(c)
    lora_targets = setup.lora.targets
    # each linear carries one adapter however often it is named (add_lora wraps it once)
    targets = [lora_targets] if isinstance(lora_targets, str) else list(dict.fromkeys(lora_targets))
    if bad := [t for t in targets if t not in lin]:
        raise ValueError(f"lora_targets {bad} are not decoder-layer linears; use names from {list(lin)}")
    dt, ldt = setup.compute_dtype.itemsize, setup.lora.dtype.itemsize
    return StepSizes(B=batch, T=seq_len, H=c.hidden_size, I=c.intermediate_size, V=c.vocab_size,
                     L=c.num_hidden_layers, heads=c.num_attention_heads, q=lin["q_proj"][1], kv=lin["k_proj"][1],
                     dt=dt, ldt=ldt, r=setup.lora.r, targets=targets, lin=lin, dropout=setup.lora.dropout,
                     dora=setup.lora.use_dora)


def layer_4bit_bytes(z: StepSizes, double_quant: bool) -> tuple[int, int, int]:
    """(codes, block scales, code tables) of one decoder layer's 4-bit linears. Two weights per byte; one absmax per
    64-block, fp32; with double quant that absmax is itself 8-bit (1 byte per 64 weights) plus an fp32 absmax per
    256 of those, and each linear has a 256-entry fp32 code beside its 16-entry one. The codes and scales stream."""
    sizes = [i * o for i, o in z.lin.values()]
    codes = sum(math.ceil(n / 2) for n in sizes)
    if double_quant:
        return codes, sum(n // 64 + 4 * math.ceil(n / 64 / 256) for n in sizes), 1024 * len(sizes)
    return codes, sum(4 * (n // 64) for n in sizes), 0


def _persistent(z: StepSizes, setup: Setup, cached: int, tied: bool, host_table: bool, stream: bool) -> dict:
    """The bytes that stay through the run, but the optimizer's state: the frozen base, embeddings, norms, the
    adapters, cuBLAS's workspaces."""
    b = {}
    # Frozen base: 4-bit (layer_4bit_bytes), or quant=None: every linear in the compute dtype.
    # Streamed (kernels/stream.py): the codes and block scales of SLOTS layers are on the device, the code tables
    # of every layer.
    if setup.quant is None:
        b["weights"], b["quant_state"] = z.L * z.layer_weights, 0
    else:
        codes, scales, tables = layer_4bit_bytes(z, setup.double_quant)
        on_device = min(SLOTS, z.L) if stream else z.L
        b["weights"] = on_device * codes
        b["quant_state"] = on_device * scales + z.L * tables
    b["cached_weights"] = cached * z.layer_weights if setup.quant is not None else 0
    # Embeddings and lm_head stay in the compute dtype (no fp32 upcast); one matrix if they are tied. An
    # embedding table in host memory leaves lm_head alone on the GPU.
    b["embed_lm_head"] = z.V * z.H * z.dt * (1 if tied or host_table else 2)
    b["norms"] = (2 * z.L + 1) * z.H * z.dt  # two RMSNorm weights per layer and the final one
    b["lora"] = z.lora_bytes  # A (r, in) and B (out, r) per target per layer, in the adapters' dtype
    b["cublas_workspace"] = CUBLAS_WORKSPACES
    return b


class _Step:
    """The decoder's activations through one step under `options`: those held when a moment comes, a layer's
    backward, and the two moments that may make the peak."""

    def __init__(self, z: StepSizes, options: PlanOptions, quantized: bool):
        self.z, self.options, self.quantized = z, options, quantized
        self.ckpt = options.layers_checkpointed(z.L)
        self.cached = min(options.cached_layers, z.L) if options.fast else 0
        # Checkpointed layers keep their (B, T, H) input, in the compute dtype. With offload it sits in pinned
        # host memory: transformers' layers bring one back at a time; a fast layer is two units (attention,
        # MLP) whose inputs come back one unit ahead, so two are on the GPU in its backward (kernels/offload.py).
        # The other layers keep their full saved set.
        self.layer_fn = fast_layer_bytes if options.fast else hf_layer_bytes
        self.units = 2 if options.fast and options.offload else 1  # checkpointed units per layer
        # from KEEP_ATTENTION tokens a row an offloaded attention unit also keeps attention's output and fp32
        # logsumexp (right-padded rows, as many kv heads as q heads); they come back with its input
        long_rows = self.units == 2 and z.T >= KEEP_ATTENTION and z.q == z.kv
        self.kept_attention = z.S * z.q * z.dt + z.lse * 4 if long_rows else 0
        self.lora_cast = z.layer_lora * z.dt if z.ldt != z.dt else 0
        # the layer's LoRA weights, cast to the compute dtype for its matmuls, are kept for the backward
        self.saved = self.layer_fn(z)["saved"] + self.lora_cast
        self.input = z.S * z.H * z.dt  # one checkpointed (B, T, H) input

    def cpu(self, host_table: bool) -> int:
        """Pinned host bytes: the offloaded checkpointed inputs (and kept attention), the embedding table."""
        z, ckpt = self.z, self.ckpt
        offloaded = self.units * ckpt * z.S * z.H * z.dt + ckpt * self.kept_attention
        return (offloaded if self.options.offload else 0) + (z.V * z.H * z.dt if host_table else 0)

    def held(self, n, inputs=None) -> int:
        """Activations of the layers 0..n-1 (the later ones' are freed by then). Offloaded fast units: the last
        two units' tensors (an attention unit's kept output among them) wait on the GPU for their release."""
        ckpt, kept = self.ckpt, 0
        if inputs is None and self.options.offload:
            inputs, kept = (2, self.kept_attention) if self.units == 2 and min(ckpt, n) else (min(ckpt, n, 1), 0)
        inputs = min(ckpt, n) if inputs is None else inputs
        return inputs * self.z.S * self.z.H * self.z.dt + kept + max(0, n - ckpt) * self.saved

    def backward(self, i) -> tuple[int, int]:
        """Layer i's backward: (activations held, its saved set (kept, or recomputed) and transients, every
        LoRA grad)."""
        z, ckpt, cached, fast = self.z, self.ckpt, self.cached, self.options.fast
        # A fast layer's projections dequantize their weights again here, unless cached, or kept from the
        # recompute (then the layer's dequantized weights are all held through its backward); offloaded, they
        # dequantize one member at a time.
        kept_w = fast and self.options.keep_weights and i < ckpt and i >= cached and self.quantized
        deq = fast and self.quantized and not (i < cached or kept_w)
        fast_options = dict(deq=deq, split=self.units == 2 and deq) if fast else {}
        lay = self.layer_fn(z, **fast_options)
        if i < ckpt and self.units == 2:  # one half recomputed at a time, keeping its own weights; its input is
            # one of the two held, and in the MLP half's backward the attention unit's kept tensors arrive too
            (att_s, att_t), (mlp_s, mlp_t) = lay["halves"]
            att_w, mlp_w = (z.weights_of(("qkv", "o")), z.weights_of(("gate_up", "down"))) if kept_w else (0, 0)
            half = max(att_s + att_t + att_w, mlp_s + mlp_t + mlp_w + self.kept_attention) - self.input
            return self.held(i + 1, inputs=2 if i else 1), half + self.lora_cast + z.lora_bytes  # no prefetch below
        extra = (z.layer_weights if kept_w else 0) + z.lora_bytes
        # a fast layer's recompute saves its input again, which is the checkpointed input already held
        recomputed = self.saved - (self.input if fast else 0) if i < ckpt else 0
        return self.held(i + 1), recomputed + lay["transient"] + extra

    def moments(self, loss_chunk: int) -> dict:
        """{"loss": ..., "backward": ...}, each (activations held, transient bytes) at that moment."""
        z = self.z
        # Loss (minilora.loss): the last hidden states, the final norm's fp32 copy and bf16 output, the (N, H)
        # supervised rows and their gradient (computed in the forward), and per chunk of n = min(N, loss_chunk)
        # rows: the fp32 logits and one transient beside them (the bf16 matmul output, then the bf16 softmax
        # gradient), counted at 8 bytes a logit, which over-predicts the measured H100 peaks by 2-5%.
        n = min(z.N, loss_chunk)
        loss = z.S * z.H * (4 + z.dt) + 2 * z.N * z.H * z.dt + n * z.V * max(8, 4 + z.dt)
        moments = {"loss": (self.held(z.L), loss)}
        # The backward peaks at its first layer, or at the first checkpointed one, which recomputes (and perhaps
        # keeps weights) while fewer activations are held.
        moments["backward"] = max((self.backward(i) for i in {z.L - 1, max(self.ckpt - 1, 0)}), key=sum)
        return moments


def format_plan(plan) -> str:
    """A readable table of a plan_memory result, in GiB."""
    rows = [f"{k:<18}{v / GiB:>9.3f}" for k, v in plan["breakdown"].items()]
    other = next(k for k in plan["phases"] if k != plan["phase"])
    return "\n".join([f"{'term':<18}{'GiB':>9}", *rows, "-" * 27,
                      f"{'total (peak)':<18}{plan['total'] / GiB:>9.3f}",
                      f"peak during {plan['phase']}; the {other} moment's transients: "
                      f"{plan['phases'][other] / GiB:.3f} GiB",
                      f"+ pinned host memory {plan['cpu'] / GiB:.3f} GiB; + CUDA context "
                      f"~{plan['cuda_context'] / GiB:.2f} GiB outside torch's counters",
                      *([f"+ paged optimizer states {plan['paged_optimizer'] / GiB:.3f} GiB in CUDA managed memory"]
                        if plan["paged_optimizer"] else [])])
