"""minilora's LoRA layer against PEFT's, on a tiny LLaMA-2-shaped model, with and without a real NF4 base.

Tolerances:
- fp32 compute: both sides run the same base layers and the same A/B values; only the order of the LoRA
  additions can differ, so logits agree to float32 round-off (<= 1e-5 max-abs, values are O(1)).
- bf16 compute: minilora computes the LoRA branch in the activation dtype (bf16), PEFT in its fp32 LoRA
  weights' dtype. One bf16 rounding is 2^-8 ~ 0.4% relative; through 2 layers the logits differ by a few
  such roundings, so the bound is 3e-2 max-abs on logits of size O(1) (measured: about 1e-2).
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import minilora as ml
from minilora.adapter import adapter_config
from minilora.lora import LoRALinear, LoraSpec, lora_layers

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTS = [None, "nf4"]


def load(base_dir, quant, dtype=torch.float32):
    model, _ = ml.load_model(base_dir, quant=quant, compute_dtype=dtype, device="cpu")
    return model


def randomize(model):
    """Non-zero random B (and fresh A) so that the LoRA branch matters; returns the values by name."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.normal_(0, 0.2)
            layer.lora_B.weight.normal_(0, 0.2)
    return {k: v.detach().clone() for k, v in ml.lora_state_dict(model).items()}


def peft_twin(base_dir, quant, values, targets=("q_proj", "v_proj"), r=8, alpha=16, dtype=torch.float32):
    """The same base wrapped by PEFT, with minilora's A/B values copied in."""
    peft = get_peft_model(load(base_dir, quant, dtype),
                          LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    params = dict(peft.named_parameters())
    with torch.no_grad():
        for k, v in values.items():
            params["base_model.model." + k.replace(".weight", ".default.weight")].copy_(v)
    return peft


def tokens(n=2, t=24):
    return torch.randint(3, 512, (n, t))


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_peft_fp32(base_dir, quant):
    model = load(base_dir, quant)
    ml.add_lora(model, r=8, alpha=16)
    values = randomize(model)
    peft = peft_twin(base_dir, quant, values)
    x = tokens()
    with torch.no_grad():
        ours, theirs, base = model(x).logits, peft(x).logits, load(base_dir, quant)(x).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - base).abs().max() > 1e-2  # the LoRA branch really contributes


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_peft_bf16(base_dir, quant):
    model = load(base_dir, quant, torch.bfloat16)
    ml.add_lora(model, r=8, alpha=16)
    values = randomize(model)  # bf16 values, exactly representable in PEFT's fp32 LoRA weights
    peft = peft_twin(base_dir, quant, values, dtype=torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x).logits.float(), peft(x).logits.float()
    assert ours.abs().max() > 0.1
    assert (ours - theirs).abs().max() <= 3e-2


@pytest.mark.parametrize("quant", QUANTS)
def test_grads_match_peft(base_dir, quant):
    model = load(base_dir, quant)
    ml.add_lora(model, targets=ALL_SEVEN, r=4, alpha=8)
    values = randomize(model)
    peft = peft_twin(base_dir, quant, values, targets=ALL_SEVEN, r=4, alpha=8)
    x = tokens()
    for m in (model, peft):
        m(x, labels=x).loss.backward()
    theirs = {k.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for k, p in peft.named_parameters() if p.requires_grad}
    ours = {k: p.grad for k, p in ml.lora_state_dict(model).items()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        rel = (ours[k] - theirs[k]).norm() / theirs[k].norm()
        assert rel <= 1e-4, k


@pytest.mark.parametrize("quant", QUANTS)
def test_adapter_round_trips_through_peft(base_dir, quant, tmp_path):
    model = load(base_dir, quant)
    ml.add_lora(model, r=8, alpha=16)
    randomize(model)
    ml.save_adapter(model, tmp_path / "ours")
    x = tokens()

    # minilora -> PEFT: zero missing, zero unexpected keys, same logits
    fresh = get_peft_model(load(base_dir, quant), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    result = set_peft_model_state_dict(fresh, load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    peft = PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "ours")
    with torch.no_grad():
        assert (model(x).logits - peft(x).logits).abs().max() <= 1e-5

    # PEFT -> minilora
    peft.save_pretrained(tmp_path / "theirs")
    again = ml.load_adapter(load(base_dir, quant), tmp_path / "theirs")
    with torch.no_grad():
        assert (again(x).logits - peft(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("quant,dtype,bound", [
    (None, torch.float32, 1e-4),
    ("nf4", torch.float32, 1e-4),  # the merge dequantizes the very weights the 4-bit layer uses, in fp32
    ("nf4", torch.bfloat16, 3e-2),  # the merged weight is rounded to bf16 (0.4%); measured 8e-3
])
def test_merge_matches_unmerged(base_dir, tmp_path, quant, dtype, bound):
    from transformers import LlamaForCausalLM

    model = load(base_dir, quant, dtype)
    ml.add_lora(model, r=8, alpha=16)
    randomize(model)
    x = tokens()
    with torch.no_grad():
        before = model(x).logits.float()
        ml.merge_lora(model)
        after = model(x).logits.float()
        ml.merge_lora(model)  # idempotent
        again = model(x).logits.float()
    assert not lora_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    assert (before - after).abs().max() <= bound
    assert torch.equal(after, again)

    model.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits.float(), after)


def test_fresh_lora_is_zero_b_and_kaiming_uniform_a(base_dir):
    """On a fresh add_lora every lora_B is exactly zero (step 0 is the base model) and lora_A is Kaiming-uniform
    with a=sqrt(5), as PEFT's: U(-b, b) with b = gain * sqrt(3 / in) and gain = sqrt(2 / (1 + a^2)), that is
    b = 1 / sqrt(in_features). Every value lies within b, and each A's mean and variance agree with U(-b, b)'s
    (0 and b^2 / 3) within 5 standard errors of their estimates over its n values: b / sqrt(3 n) for the mean,
    sqrt(4 / 45) b^2 / sqrt(n) for the variance (Var(X^2) = E X^4 - (E X^2)^2 = b^4 / 5 - b^4 / 9). At r=64,
    n is 8192 or 16384, so the variance is pinned within about 5%: a bound of sqrt(3 / in) or sqrt(6 / in) (the
    other usual gains), or a normal init (values beyond b), fail. The seed is fixed (conftest), so the outcome
    is too."""
    model = load(base_dir, None)
    ml.add_lora(model, targets=ALL_SEVEN, r=64, alpha=16)  # in_features 128, and 256 for down_proj
    layers = lora_layers(model)
    assert len(layers) == 2 * len(ALL_SEVEN)
    for name, layer in layers.items():
        B, A = layer.lora_B.weight, layer.lora_A.weight
        assert torch.equal(B, torch.zeros_like(B)), name
        fan_in = layer.base.in_features
        assert A.shape == (64, fan_in)
        b, n, a = 1 / fan_in**0.5, A.numel(), A.detach().double().flatten()
        assert a.abs().max() <= b, name
        assert abs(a.mean()) <= 5 * b / (3 * n) ** 0.5, name
        assert abs(a.var(correction=0) - b**2 / 3) <= 5 * (4 / 45) ** 0.5 * b**2 / n**0.5, name
    a0, a1 = (layers[f"model.layers.{i}.self_attn.q_proj"].lora_A.weight for i in (0, 1))
    assert not torch.equal(a0, a1)  # drawn for each layer, not copied


def test_layer_merge_is_explicit_and_idempotent():
    layer = LoRALinear(torch.nn.Linear(64, 32), LoraSpec(r=4, alpha=8))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    y = layer(x)
    layer.eval()  # eval() must not merge
    assert not layer.merged
    first = layer.merge()
    assert layer.merge() is first
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_dropout_only_in_training():
    layer = LoRALinear(torch.nn.Linear(64, 64), LoraSpec(r=8, alpha=16, dropout=0.5))
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 64)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    base_only = layer.base(x) + layer.scaling * layer.lora_B(layer.lora_A(x))
    assert torch.allclose(layer(x), base_only, atol=1e-6)


@pytest.mark.parametrize("targets", [("q_proj",), ("q_proj", "v_proj"), ("gate_proj", "down_proj"), ALL_SEVEN])
@pytest.mark.parametrize("quant", QUANTS)
def test_add_lora_targets_and_trainable_count(base_dir, quant, targets):
    model = load(base_dir, quant)
    names = ml.add_lora(model, targets=targets, r=4, alpha=8)
    n_layers = model.config.num_hidden_layers
    assert len(names) == n_layers * len(targets)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(targets)
    assert set(lora_layers(model)) == set(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(ml.lora_state_dict(model))

    peft = get_peft_model(load(base_dir, quant), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ours == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_bad_inputs(base_dir, tmp_path):
    model = load(base_dir, None)
    with pytest.raises(ValueError, match=r"targets=\['qkv'\]: \['qkv'\] match no linear layer; the model's linear "
                                         r"layers are .*q_proj"):
        ml.add_lora(model, targets=("qkv",))
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        ml.add_lora(model, r=0)
    with pytest.raises(ValueError, match="unknown quant='int3'"):
        ml.load_model(base_dir, quant="int3", device="cpu")
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        ml.save_adapter(model, tmp_path / "none")

    ml.add_lora(model, r=8, alpha=16)
    ml.save_adapter(model, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ml.load_adapter(model, tmp_path / "nowhere")

    weights = tmp_path / "a" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated file
    with pytest.raises(ValueError, match="corrupt"):
        ml.load_adapter(model, tmp_path / "a")
    weights.write_bytes(good)

    other = load(base_dir, None)
    ml.add_lora(other, targets=ALL_SEVEN, r=8, alpha=16)  # more layers than the file has
    with pytest.raises(ValueError, match="missing keys"):
        ml.load_adapter(other, tmp_path / "a")
    import json

    config_path = tmp_path / "a" / "adapter_config.json"
    good_config = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(good_config), "rank_pattern": {"q_proj": 4}}))
    with pytest.raises(ValueError, match="unsupported adapter config.*rank_pattern"):
        ml.load_adapter(load(base_dir, None), tmp_path / "a")
    config_path.write_text(good_config)

    wider = load(base_dir, None)
    ml.add_lora(wider, r=16, alpha=32)  # same scaling, other shapes
    with pytest.raises(ValueError, match="shape mismatches"):
        ml.load_adapter(wider, tmp_path / "a")


def test_mark_only_lora_trainable_freezes_all_else(base_dir):
    model = load(base_dir, "nf4")
    ml.add_lora(model, r=4, alpha=8)
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())  # as a user's code might leave them (4-bit weights cannot)
    ml.mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_A." in n or ".lora_B." in n}
    assert len(trainable) == 2 * len(lora_layers(model)) == 2 * 2 * model.config.num_hidden_layers


def test_add_lora_on_a_model_with_lora_says_what_it_carries(base_dir):
    """One adapter a model: targets that carry LoRA already are named (never LoRALinear's own linears); other
    targets take LoRA with the same r, alpha and dropout only."""
    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16)
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] already carry LoRA \(r=8, alpha=16, dropout=0.0\); "
                                         r"train or save that adapter as it is, or load the model again"):
        ml.add_lora(model, targets=("q_proj", "k_proj"), r=8, alpha=16)
    with pytest.raises(ValueError, match=r"the model's LoRA has r=8, alpha=16, dropout=0.0, and one adapter has one "
                                         r"setting: add LoRA on \['k_proj'\] with those"):
        ml.add_lora(model, targets=("k_proj",), r=4, alpha=16)
    layers = r"the model's linear layers are \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', " \
             r"'v_proj'\]$"
    with pytest.raises(ValueError, match=r"\['v_porj'\] match no linear layer; " + layers):
        ml.add_lora(model, targets=("v_porj",), r=8, alpha=16)
    assert ml.add_lora(model, targets=("k_proj",), r=8, alpha=16) == [f"model.layers.{i}.self_attn.k_proj"
                                                                      for i in range(2)]
    assert adapter_config(model)["target_modules"] == ["k_proj", "q_proj", "v_proj"]  # one adapter
