"""Loading: the tokenizer from every source users have, checked; the model in each quantization; preparing it."""

import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

import minilora as ml

TEXT = "Привет, world! 你好 [INST] 123"


def test_tokenizer_from_a_bare_sentencepiece_dir(tok_dir, tokenizer):
    assert sorted(os.listdir(tok_dir)) == ["tokenizer.model"]
    assert len(tokenizer) == 512 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0  # LLaMA has no pad; unk is never a label


def test_tokenizer_from_a_tokenizer_json_dir(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert "tokenizer.json" in os.listdir(tmp_path) and "tokenizer.model" not in os.listdir(tmp_path)
    again = ml.load_tokenizer(str(tmp_path))
    assert again.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT, add_special_tokens=False)


def test_tokenizer_from_a_hub_id_offline(tokenizer, tmp_path):
    # A hub id resolves through the HF cache; build the cache layout for "minilora/tiny" by hand, offline.
    from minilora.tiny import tiny_config

    snapshot = tmp_path / "models--minilora--tiny" / "snapshots" / ("0" * 40)
    tokenizer.save_pretrained(snapshot)
    tiny_config().save_pretrained(snapshot)  # AutoTokenizer reads a repo's config.json first
    (tmp_path / "models--minilora--tiny" / "refs").mkdir()
    (tmp_path / "models--minilora--tiny" / "refs" / "main").write_text("0" * 40)
    code = ("import minilora as ml; t = ml.load_tokenizer('minilora/tiny'); "
            f"print(t.encode({TEXT!r}, add_special_tokens=False))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip().splitlines()[-1] == str(tokenizer.encode(TEXT, add_special_tokens=False))


def test_broken_tokenizers_fail_loudly(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.model").write_bytes(os.urandom(4000))
    with pytest.raises(ValueError, match="could not load a tokenizer from .*corrupt"):
        ml.load_tokenizer(str(corrupt))

    # The silent failure: a tokenizer with only its 3 special tokens, which encodes text to nothing useful.
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=empty, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="is broken: 3 tokens"):
        ml.load_tokenizer(str(tmp_path / "three"))


@pytest.mark.parametrize("quant", ["nf4", "fp4", None])
def test_load_model_quantizations(base_dir, quant):
    model, _ = ml.load_model(base_dir, quant=quant, compute_dtype=torch.float32, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    if quant is None:
        assert type(q) is torch.nn.Linear
    else:
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == quant
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays unquantized, as in the QLoRA recipe


def test_prepare_for_training(base_dir):
    model, _ = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    ml.add_lora(model, r=4, alpha=8)
    for _ in range(2):  # preparing twice wraps each layer once
        ml.prepare_for_training(model, gradient_checkpointing=True)
    layer = model.model.layers[0]
    assert layer.forward.func.__name__ == "_layer_forward" and layer.forward.args[0].__name__ == "forward"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ml.lora_state_dict(model))
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16  # no upcast
    assert model.config.use_cache is False
    ml.prepare_for_training(model, gradient_checkpointing=False)
    assert "forward" not in layer.__dict__  # back to the class's forward


def test_save_merged_writes_a_checkpoint_that_loads_alone(base_dir, tmp_path):
    """The merged model, written with its tokenizer, loads as a plain checkpoint and computes what the adapter
    on its base computed: fp32 logits within 1e-5 (W + s B A is rounded once, the unmerged sum twice)."""
    model, tok = ml.load_model(base_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ml.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for p in ml.lora_state_dict(model).values():
            p.normal_(0, 0.1)  # B is zero at init: make the update matter
    ids = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ml.save_merged(model, tok, str(tmp_path / "merged"))
    merged, tok2 = ml.load_model(str(tmp_path / "merged"), quant=None, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert tok2.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, add_special_tokens=False)
    assert not any(isinstance(m, (ml.LoRALinear, bnb.nn.Linear4bit)) for m in merged.modules())
