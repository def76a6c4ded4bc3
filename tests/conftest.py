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


def _tiny_checkpoint(tok_dir, out, **config):
    import shutil

    from transformers import LlamaForCausalLM

    from minilora.tiny import tiny_config

    torch.manual_seed(1234)
    LlamaForCausalLM(tiny_config(vocab_size=512, **config)).save_pretrained(out)
    shutil.copy(os.path.join(tok_dir, "tokenizer.model"), out)
    return str(out)


@pytest.fixture(scope="session")
def base_dir(tok_dir, tmp_path_factory):
    """A tiny random LLaMA-2-shaped checkpoint (fp32, grouped-query attention) with the test tokenizer beside it."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def mha_dir(tok_dir, tmp_path_factory):
    """The same with as many kv heads as q heads, as Llama-2 7B and 13B (the kept-attention path needs it)."""
    return _tiny_checkpoint(tok_dir, tmp_path_factory.mktemp("mha"), num_key_value_heads=4)
