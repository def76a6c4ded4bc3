"""Streamed 4-bit weights (kernels/stream.py) on the CPU, where the same bookkeeping runs as on a GPU with plain
copies, and a layer that is out has NaN block scales: a step that read a layer outside its window would give a NaN
loss or gradient. A model of 7 layers (deep_dir): more than stream.SLOTS, so that the slots are reused in both
directions."""

import importlib

import pytest
import torch

import minilora as ml
from minilora.kernels import stream as weights
from minilora.kernels.lora4bit import is_4bit
from minilora.plan import PlanOptions, plan_memory

from test_train import adapter, losses, run


def _model(deep_dir, **prepare):
    model, tok = ml.load_model(deep_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    ml.add_lora(model, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.05)  # B nonzero: the LoRA terms reach the loss
    ml.prepare_for_training(model, fast=True, gradient_checkpointing=True, **prepare)
    return model.train(), tok


def _steps(model, tok):
    """Two steps' losses and the LoRA grads they sum, with an evaluation forward between them."""
    from minilora.data import Collator
    from minilora.template import encode_rows
    from minilora.tiny import instruction_rows

    examples, _ = encode_rows(instruction_rows(6, seed=3), tok, 128)
    collate = Collator(tok.pad_token_id)
    out = []
    for i in range(2):
        torch.manual_seed(i)  # the same dropout masks in both runs
        loss, n = ml.causal_lm_loss(model, collate(examples[3 * i:3 * i + 3]))
        (loss / n).backward()
        out.append(loss.item())
        with torch.no_grad():
            out.append(ml.causal_lm_loss(model, collate(examples[:2]))[0].item())
    return out, {k: p.grad.clone() for k, p in ml.lora_state_dict(model).items()}


@pytest.mark.parametrize("offload", [False, True], ids=["layers", "halves"])
def test_streamed_steps_equal_resident_steps(deep_dir, offload):
    """Each layer's weights copied in as it runs (forward, evaluation, the backward's recompute) give the resident
    weights' losses and gradients exactly: the same tensors, read from the slots. Offloaded, each layer is two
    checkpointed units, and both of its backward units read it."""
    resident = _steps(*_model(deep_dir, offload=offload))
    model, tok = _model(deep_dir, offload=offload, stream=True)
    stream = weights.streamed(model.model.layers[0])[0]
    assert len(stream.slots) == weights.SLOTS < len(model.model.layers)
    streamed = _steps(model, tok)
    assert streamed[0] == resident[0]
    assert all(torch.equal(streamed[1][k], resident[1][k]) for k in resident[1])


def test_only_the_layers_in_their_slots_are_on_the_device(deep_dir):
    """After a forward, the last SLOTS layers sit in their slots (the backward starts with them); every other
    layer's parameters point at its host copy, whose block scales are NaN here: a read of it is never silent."""
    model, tok = _model(deep_dir, stream=True)
    stream = weights.streamed(model.model.layers[0])[0]
    batch = {"input_ids": torch.randint(3, 500, (2, 16)), "labels": torch.randint(3, 500, (2, 16))}
    with torch.no_grad():
        assert torch.isfinite(ml.causal_lm_loss(model, batch)[0])
    L = len(model.model.layers)
    assert sorted(stream.holds) == list(range(L - weights.SLOTS, L))
    for i, layer in enumerate(model.model.layers):
        scales = layer.self_attn.q_proj.base.weight.quant_state.state2.absmax
        in_slot = i >= L - weights.SLOTS
        assert torch.isfinite(scales).all() == in_slot
        assert any(scales is t for t in stream.slots[i % weights.SLOTS]) == in_slot
    # the host holds every layer's codes and scales, as many bytes as the planner counts
    layer = sum(getattr(o, n).nbytes for m in model.model.layers[0].modules() if is_4bit(m)
                for o, n in weights.streamed_tensors(m.weight))
    planned = plan_memory(model.config, 2, 16, PlanOptions(fast=True, stream=True), lora_r=4)["streamed_host"]
    assert sum(t.nbytes for ts in stream.host for t in ts) == len(model.model.layers) * layer == planned


def test_streaming_is_refused_where_a_layer_would_be_read_out_of_its_window(deep_dir):
    """A layer that is not checkpointed runs its backward through autograd, outside any use() window; cached
    layers keep their own weights; transformers' layers have no window at all."""
    model, _ = ml.load_model(deep_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, r=4, alpha=8)
    for fields in (dict(fast=True, gradient_checkpointing=3), dict(fast=True, cached_layers=1),
                   dict(fast=False)):
        with pytest.raises(ValueError, match="stream=True needs fast=True, every layer checkpointed"):
            ml.prepare_for_training(model, stream=True, **fields)
    plain, _ = ml.load_model(deep_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    ml.add_lora(plain, r=4, alpha=8)
    with pytest.raises(ValueError, match="stream=True streams 4-bit weights"):
        ml.prepare_for_training(plain, fast=True, stream=True)


def test_a_streamed_model_is_not_merged(deep_dir):
    """Most of a streamed model's 4-bit weights are not on the device (on the CPU here: NaN scales), so a merge
    would fold garbage into the weights: it is refused, with what to do instead."""
    model, _ = _model(deep_dir, stream=True)
    with pytest.raises(ValueError, match="wait in host memory.*load_model\\(device='cpu'\\)"):
        ml.merge_lora(model)


def test_prepared_again_without_stream_the_weights_come_back(deep_dir):
    """prepare_for_training without stream puts every layer's weights back in tensors of their own, and transformers'
    forward then reads them all: the logits of the model never streamed."""
    ids = torch.randint(3, 500, (1, 12))
    ref, _ = _model(deep_dir)
    model, _ = _model(deep_dir, stream=True)
    ml.prepare_for_training(model, fast=True)
    assert weights.streamed(model.model.layers[0]) is None
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref.eval()(ids).logits)


def test_transformers_forward_of_a_streamed_model_reads_through_the_window(deep_dir):
    """transformers' own forward (a user's `model(ids)`, its generate) fetches each decoder layer as it runs: the
    resident model's logits and greedy tokens exactly. With grad enabled, where its backward would read layers that
    are out by then, it is refused; prepared again without stream, the hooks are gone and it trains as before."""
    ids = torch.randint(3, 500, (2, 12))
    ref, _ = _model(deep_dir)
    model, _ = _model(deep_dir, stream=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref.eval()(ids).logits)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), ref.generate(ids, **greedy))
    with pytest.raises(RuntimeError, match=r"runs under torch.no_grad\(\) only"):
        model(ids)
    ml.prepare_for_training(model, fast=True)
    assert torch.isfinite(model(ids).logits).all()


def test_a_streamed_train_equals_a_resident_one(deep_dir, tmp_path, monkeypatch):
    """train() under a plan that streams (on a GPU the plan chooses it when nothing resident fits; here the plan is
    given) trains the adapter the resident run trains, bit for bit, and leaves the model streamed."""
    loop = importlib.import_module("minilora.loop")
    plan = loop.plan_run

    def streaming(model, cfg):
        options, line, shape_plan = plan(model, cfg)
        return options.__class__(**{**vars(options), "stream": True}), line + "; streamed", shape_plan

    common = dict(max_steps=4, max_len=128, log_every=1, lora_dropout=0.1)
    _, _, ref = run(deep_dir, tmp_path / "resident", **common)
    monkeypatch.setattr(loop, "plan_run", streaming)
    model, _, got = run(deep_dir, tmp_path / "streamed", **common)
    assert losses(got) == losses(ref)
    a, b = adapter(tmp_path / "resident" / "adapter"), adapter(tmp_path / "streamed" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert weights.streamed(model.model.layers[0]) is not None
    # the fast layers stay for a streamed model, so that evaluation after train() reads the weights through them:
    # the resident model's loss through transformers' layers, within fp32 round-off (1e-5)
    resident, tok = ml.load_model(deep_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(resident, r=8, alpha=16)
    ml.load_adapter(resident, str(tmp_path / "resident" / "adapter"))
    batch = {"input_ids": torch.randint(3, 500, (2, 24)), "labels": torch.randint(3, 500, (2, 24))}
    with torch.no_grad():
        assert ml.causal_lm_loss(model.eval(), batch)[0].item() == pytest.approx(
            ml.causal_lm_loss(resident.eval(), batch)[0].item(), rel=1e-5)


@pytest.mark.parametrize("which", ["deep", "qwen2"])
def test_loaded_for_streaming_the_weights_are_load_models(which, deep_dir, qwen2_dir):
    """load_streamed quantizes each decoder linear on its own and parks its codes and scales in host memory: the
    same 4-bit codes and scales, bit for bit, as load_model's, and the same logits once prepared (resident or
    streamed). Qwen2: q, k and v biases, and an lm_head tied to the embedding."""
    from minilora.host_load import load_streamed

    source = deep_dir if which == "deep" else qwen2_dir
    ref, _ = ml.load_model(source, quant="nf4", compute_dtype=torch.float32, device="cpu")
    got, _ = load_streamed(source, compute_dtype=torch.float32, device="cpu")
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    for m, n in zip(ref.modules(), got.modules()):
        if is_4bit(m):
            assert all(torch.equal(getattr(o, k), getattr(p, k)) for (o, k), (p, _) in zip(
                weights.streamed_tensors(m.weight), weights.streamed_tensors(n.weight)))
    ids = torch.randint(3, 500, (1, 12))
    for model in (ref, got):
        ml.add_lora(model, r=4, alpha=8)
    ml.prepare_for_training(got, fast=True, gradient_checkpointing=True, stream=True)
    with torch.no_grad():
        assert torch.equal(ml.causal_lm_loss(ref.eval(), {"input_ids": ids, "labels": ids})[0],
                           ml.causal_lm_loss(got.eval(), {"input_ids": ids, "labels": ids})[0])


def test_a_checkpoint_without_safetensors_or_a_weight_is_named(deep_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from minilora.host_load import load_streamed

    bare = tmp_path / "bare"
    shutil.copytree(deep_dir, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="holds no .safetensors files; load it with load_model"):
        load_streamed(str(bare), device="cpu")
    tensors = load_file(f"{deep_dir}/model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, str(bare / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights .*layers\.3\.mlp\.down_proj"):
        load_streamed(str(bare), device="cpu")
