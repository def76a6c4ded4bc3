"""Shared fixtures: a sentencepiece tokenizer trained on the spot and tiny LLaMA-2-shaped models.

Nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from minilora.model import load_tokenizer  # noqa: E402
from minilora.tiny import train_tokenizer  # noqa: E402

CORPUS = [
    "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris.",
    "[INST] Write a haiku about the sea. [/INST] Waves fold into foam,\nsalt wind carries gull voices.",
    "The quick brown fox jumps over the lazy dog 0123456789 times, said the teacher.",
    "Привет! Как дела? Я изучаю машинное обучение и большие языковые модели.",
    "你好，世界。我们正在训练一个小的语言模型。",
    "¿Cómo estás? Me gradué hace poco de la universidad y busco trabajo.",
] * 20


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A directory holding only a sentencepiece `tokenizer.model`, as users get from Meta's release."""
    return train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok")), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_checkpoint(tok_dir, out, family="llama", **config):
    """A tiny random checkpoint of a family's architecture (FAMILIES), with the test tokenizer beside it."""
    import shutil

    from transformers import AutoModelForCausalLM

    from minilora.tiny import tiny_config

    torch.manual_seed(1234)
    kind, extra = FAMILIES[family]  # LLaMA-2's tiny sizes, the family's own fields
    AutoModelForCausalLM.from_config(tiny_config(512, kind, **{**extra, **config})).save_pretrained(out)
    if family == "llama":  # LLaMA 2's checkpoints hold a sentencepiece tokenizer.model
        shutil.copy(os.path.join(tok_dir, "tokenizer.model"), out)
    else:  # the same tokenizer, saved as itself: beside another family's config it would load as that family's
        load_tokenizer(tok_dir).save_pretrained(out)
    return str(out)


def _families():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": (LlamaConfig, {}),
        # Llama 3.2: rope_type llama3 (frequencies rescaled by wavelength bands; an original context of 32 puts
        # the tests' positions past it) and lm_head tied to the embedding
        "llama3": (LlamaConfig, dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=32),
                                     tie_word_embeddings=True)),
        "mistral": (MistralConfig, dict(sliding_window=256)),  # the tests' rows fit the window
        "qwen2": (Qwen2Config, dict(tie_word_embeddings=True)),  # q, k, v biases
        "qwen3": (Qwen3Config, {}),  # q and k normalized: no fast path, transformers' layers
    }


FAMILIES = _families()


@pytest.fixture(scope="session")
def base_dir(tok_dir, tmp_path_factory):
    """A tiny random LLaMA-2-shaped checkpoint (fp32, grouped-query attention) with the test tokenizer beside it."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def mha_dir(tok_dir, tmp_path_factory):
    """The same with as many kv heads as q heads, as Llama-2 7B and 13B (the kept-attention path needs it)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("mha"), num_key_value_heads=4)


@pytest.fixture(scope="session")
def deep_dir(tok_dir, tmp_path_factory):
    """The same with 7 layers: more than the streamed weights' device slots (kernels/stream.SLOTS)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("deep"), num_hidden_layers=7)


@pytest.fixture(scope="session", params=["llama3", "mistral", "qwen2"])
def family_dir(request, tok_dir, tmp_path_factory):
    """A tiny checkpoint of each LLaMA family the fast layers serve besides LLaMA 2 (conftest.FAMILIES)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp(request.param), family=request.param)


@pytest.fixture(scope="session")
def qwen2_dir(tok_dir, tmp_path_factory):
    """A tiny Qwen2 alone (q, k, v biases, tied embeddings)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("qwen2-alone"), family="qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tok_dir, tmp_path_factory):
    """A tiny Qwen3: a family the fast layers do not serve (q and k normalized)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("qwen3"), family="qwen3")
