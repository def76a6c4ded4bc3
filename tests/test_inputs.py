"""Bad input to the library, as a new user gives it: every mistake gets a clear answer, and a failed call leaves
the model as it found it. (Bad data files and rows: test_data.py; the example's CLI: test_examples.py.)"""

import importlib
import json
import logging
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora as ml
from minilora.checkpoint import CorruptFile, load_training_state
from minilora.template import encode_rows
from minilora.tiny import instruction_rows

generate_module = importlib.import_module("minilora.generate")
ROWS = instruction_rows(12, seed=3)
EMPTY_Q = "<s>[INST] Hi [/INST] Hello! </s><s>[INST]  [/INST] Anything else? </s>"
EMPTY_A = "<s>[INST] Say nothing. [/INST]  </s>"


def load(base_dir):
    return ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")


def config(out, **overrides):
    kw = dict(output_dir=str(out), max_steps=4, batch_size=4, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.1,
              log_every=1, max_len=128, progress=False, seed=7)
    return ml.TrainConfig(**{**kw, **overrides})


def snapshot(model):
    """Everything a failed call must leave alone: module types, parameters and their requires_grad, forwards."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            {i: "forward" in layer.__dict__ for i, layer in enumerate(model.model.layers)})


def assert_unchanged(model, before):
    types, params, forwards = snapshot(model)
    assert types == before[0] and forwards == before[2] and params.keys() == before[1].keys()
    for n, (p, grad) in params.items():
        assert torch.equal(p, before[1][n][0]) and grad == before[1][n][1], n


@pytest.mark.parametrize("bad,match", [
    (dict(lr=-1e-4), "lr=-0.0001 must be a positive number"), (dict(lr=math.nan), "lr=nan"),
    (dict(lr=math.inf), "lr=inf"), (dict(max_len=2), "max_len=2 must be at least 64"),
    (dict(max_len=1), "max_len=1 must be at least 64"), (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(warmup_ratio=1.0), r"warmup_ratio=1.0 must be in \[0, 1\)"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(max_grad_norm=0), "max_grad_norm=0 must be positive"), (dict(optimizer="sgd"), "optimizer='sgd'"),
    (dict(precision="fp8"), "precision='fp8'"), (dict(eval_every=0), "eval_every=0 must be at least 1, or None"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(epochs=0), "epochs=0 must be a positive number"),
    (dict(epochs=math.inf), "epochs=inf must be a positive number"),
    (dict(fsdp=True, optimizer="adamw_8bit"), "fsdp=True trains with .* optimizer 'adamw'"),
    (dict(fsdp=True, precision="fp16"), "fsdp=True trains with precision 'bf16' or 'fp32'"),
])
def test_config_is_refused_when_made(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **bad)


@pytest.mark.parametrize("bad,message", [
    (dict(max_steps="3"), "max_steps='3' must be int or None; pass max_steps=3"),
    (dict(lr="2e-4"), "lr='2e-4' must be float; pass lr=0.0002"),
    (dict(batch_size=2.0), "batch_size=2.0 must be int; pass batch_size=2"),
    (dict(progress="yes"), "progress='yes' must be bool; pass progress=True"),
    (dict(targets="q_proj"), "targets='q_proj' must be a tuple of str; pass targets=('q_proj',)"),
    (dict(targets=["q_proj", 7]), "targets=['q_proj', 7] must be a tuple of str; pass targets=('q_proj', 'v_proj')"),
    (dict(epochs=None), "epochs=None must be float; pass epochs=1.0"),
    (dict(max_steps=True), "max_steps=True must be int or None; pass max_steps=None"),
    (dict(precision=16), "precision=16 must be str or None; pass precision=None"),
])
def test_config_of_the_wrong_type_is_one_type_error(tmp_path, bad, message):
    with pytest.raises(TypeError) as err:
        config(tmp_path, **bad)
    assert str(err.value) == message


def test_config_takes_an_int_for_a_float_and_a_list_for_a_tuple(tmp_path):
    cfg = config(tmp_path, lr=1, lora_alpha=16, targets=["q_proj"], sample_prompts=["Hi", "Hola"], max_steps=None)
    assert (cfg.lr, cfg.targets, cfg.sample_prompts, cfg.max_steps) == (1, ("q_proj",), ("Hi", "Hola"), None)


def test_train_checks_config_and_data_before_touching_the_model(base_dir, tmp_path):
    model, tok = load(base_dir)
    before = snapshot(model)
    cfg = config(tmp_path)
    cfg.lr = -1.0  # changed after the config was made: train() checks again, first
    with pytest.raises(ValueError, match="lr=-1.0 must be a positive number"):
        ml.train(model, tok, ROWS, cfg)
    cfg.lr, cfg.max_steps = 1e-2, "3"
    with pytest.raises(TypeError, match="max_steps='3' must be int or None; pass max_steps=3"):
        ml.train(model, tok, ROWS, cfg)
    with pytest.raises(ml.MalformedRow, match=r"malformed row 12: no \[/INST\].*TrainConfig\(skip_malformed=True\)"):
        ml.train(model, tok, ROWS + ["not a chat row"], config(tmp_path))
    data = encode_rows(ROWS, tok, max_len=200)
    with pytest.raises(ValueError, match="more than max_len=64"):
        ml.train(model, tok, data, config(tmp_path, max_len=64))
    examples, stats = encode_rows(ROWS, tok, max_len=128)
    examples[2] = {**examples[2], "labels": [-100] * len(examples[2]["labels"])}
    with pytest.raises(ValueError, match=r"encoded examples \[2\] supervise no token"):
        ml.train(model, tok, (examples, stats), config(tmp_path))
    with pytest.raises(ValueError, match=r"fsdp=True needs a torch.distributed process group \(torchrun"):
        ml.train(model, tok, ROWS, config(tmp_path, fsdp=True))
    assert_unchanged(model, before)
    assert not os.listdir(tmp_path)


def test_failed_load_adapter_leaves_the_model_as_it_was(base_dir, tmp_path):
    model, _ = load(base_dir)
    ml.add_lora(model, r=4, alpha=8)
    ml.save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    # adapters from other bases: a wider one (other shapes) and a deeper one (a layer this model lacks)
    for name, changed in [("wider", {**tensors, key: torch.randn(4, 256)}),
                          ("deeper", {**tensors, key.replace("layers.0", "layers.7"): tensors[key].clone()})]:
        shutil.copytree(tmp_path / "a", tmp_path / name)
        save_file(changed, tmp_path / name / "adapter_model.safetensors")
        fresh, _ = load(base_dir)  # no LoRA yet: load_adapter adds it, and must take it out again
        before = snapshot(fresh)
        with pytest.raises(ValueError, match="does not fit this model"):
            ml.load_adapter(fresh, tmp_path / name)
        assert_unchanged(fresh, before)
        assert not [m for m in fresh.modules() if isinstance(m, ml.LoRALinear)]

    with torch.no_grad():  # a model with LoRA: a scaling mismatch must not copy a single weight
        for p in ml.lora_state_dict(model).values():
            p.normal_()
    before = snapshot(model)
    wide, _ = load(base_dir)
    ml.add_lora(wide, r=4, alpha=16)
    ml.save_adapter(wide, tmp_path / "c")
    with pytest.raises(ValueError, match="differs in its scaling or DoRA from the adapter's"):
        ml.load_adapter(model, tmp_path / "c")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match="differs in its scaling or DoRA from the adapter's"):
        ml.load_adapter(model, tmp_path / "a")
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match="unsupported adapter config"):
        ml.load_adapter(model, tmp_path / "a")
    weights = tmp_path / "c" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptFile, match="corrupt"):
        ml.load_adapter(model, tmp_path / "c")
    assert_unchanged(model, before)


def test_a_recorded_chat_template_reads_back_or_is_named_corrupt(base_dir, tmp_path):
    """save_template's record: read back as written, None where there is none (PEFT's adapters), and a damaged one
    a CorruptFile naming its path, never a guess. An adapter saved without a template over one saved with it
    leaves no record of the earlier weights' template."""
    from minilora.adapter import save_template, saved_template

    model, _ = load(base_dir)
    ml.add_lora(model, r=4, alpha=8)
    ml.save_adapter(model, tmp_path / "a", template="chatml")
    assert saved_template(str(tmp_path / "a")) == "chatml"
    ml.save_adapter(model, tmp_path / "a")
    assert saved_template(str(tmp_path / "a")) is None
    save_template(str(tmp_path), "jinja:0123456789ab")
    assert saved_template(str(tmp_path)) == "jinja:0123456789ab"
    record = tmp_path / "minilora_template.json"
    for damaged in ('{"template": "llama', '{"template": 3}', '["llama2"]', "{}"):
        record.write_text(damaged)
        with pytest.raises(CorruptFile, match=f"^{record} .*; delete it and name the chat template yourself$"):
            saved_template(str(tmp_path))


def test_resume_names_corrupt_checkpoints_and_falls_back_bit_exactly(base_dir, tmp_path, capsys):
    rows = ROWS + [EMPTY_Q, EMPTY_A, "not a chat row"]
    model, tok = load(base_dir)
    history = ml.train(model, tok, rows, config(tmp_path / "a", save_every=2, skip_malformed=True))
    start = history[0]
    assert (start["empty_questions"], start["empty_answers"]) == (1, 1)
    assert start["skipped_rows"] == {"no [/INST]": 1} and start["examples"] == 14
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["precision"] == "fp32"  # None on a CPU
    final = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")

    state = tmp_path / "a" / "checkpoint-4" / "training_state.pt"
    good = state.read_bytes()
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the half line a kill mid-write leaves
    data = encode_rows(rows, tok, max_len=128, skip_malformed=True)  # taken as it is: the same examples
    for corrupt in (good[: len(good) // 2], os.urandom(len(good))):  # truncated; garbage (UnpicklingError)
        state.write_bytes(corrupt)
        model, tok = load(base_dir)
        ml.add_lora(model, r=4, alpha=8)
        with pytest.raises(CorruptFile, match=f"{state} cannot be read back") as err:
            load_training_state(model, str(state.parent), *([None] * 3))
        assert "weights_only" not in str(err.value) and err.value.__cause__ is None
        capsys.readouterr()
        model, tok = load(base_dir)
        history = ml.train(model, tok, data, config(tmp_path / "a", save_every=2, resume="latest"))
        out = capsys.readouterr().out
        assert f"resume='latest': {state} cannot be read back" in out and "trying the checkpoint before it" in out
        assert "weights_only" not in out
        resumed = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
        assert all(torch.equal(final[k], resumed[k]) for k in final)  # from checkpoint-2, as if never stopped
        assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]

    model, tok = load(base_dir)
    ml.train(model, tok, data, config(tmp_path / "b", max_steps=1, resume="latest"))
    assert f"resume='latest': no checkpoint in {tmp_path / 'b'}, starting from step 0" in capsys.readouterr().out


def test_generate_is_greedy_in_eval_mode_and_follows_the_model_dtype(base_dir, monkeypatch):
    model, tok = load(base_dir)
    ml.add_lora(model, r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.5)  # a LoRA update that matters, so dropout would change the answers
    model.train()  # as train() leaves it
    precisions = []
    real_autocast = generate_module.autocast
    monkeypatch.setattr(generate_module, "autocast", lambda device, p: precisions.append(p) or real_autocast(device, p))
    answers = {ml.generate(model, tok, "What is the capital of France?", max_new_tokens=12) for _ in range(3)}
    assert len(answers) == 1 and model.training  # greedy means one answer; the mode is given back
    assert precisions == ["fp32"] * 3  # an fp32 model generates in fp32
    model.eval()
    assert ml.generate(model, tok, "What is the capital of France?", max_new_tokens=12) in answers
    assert not model.training
    half, _ = ml.load_model(base_dir, quant=None, compute_dtype=torch.bfloat16, device="cpu")
    ml.generate(half, tok, "Hi", max_new_tokens=2)
    assert precisions[-1] == "bf16"


def test_default_precision(monkeypatch):
    assert ml.config.default_precision("cpu") == "fp32"
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert ml.config.default_precision(torch.device("cuda")) == expected


def test_load_model_refuses_what_is_no_causal_lm_before_building_anything(tmp_path, monkeypatch):
    from transformers import ViTConfig

    ViTConfig(architectures=["ViTForImageClassification"]).save_pretrained(tmp_path / "vit")  # config only
    monkeypatch.setattr("minilora.model.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("weights were built for a model that is no causal LM"))
    with pytest.raises(ValueError, match=r"holds a 'vit' model \(ViTForImageClassification\), which transformers "
                                         r"cannot load as a causal LM"):
        ml.load_model(str(tmp_path / "vit"), device="cpu")
    for load_it in (lambda p: ml.load_model(p, device="cpu"), ml.load_tokenizer):
        with pytest.raises(FileNotFoundError, match="no-such-dir' does not exist; pass a .* dir or a hub id"):
            load_it(str(tmp_path / "no-such-dir"))


def test_bitsandbytes_kernels_notices_are_filtered_and_nothing_else(caplog):
    bnb, kernels = (logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"))
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...",
                    ImportError("No module named 'kernels'"))
        bnb.warning("some other bitsandbytes warning")
        for repo in ("kernels-community/quantization-bitsandbytes", "someone/else"):  # as `kernels` logs it offline
            kernels.warning(f"Skipping publisher trust check for '{repo}' because Hugging Face Hub is in offline mode.")
    assert [r.getMessage() for r in caplog.records] == [
        "some other bitsandbytes warning",
        "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode."]
