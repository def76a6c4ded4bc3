"""Chat templates as values (minilora.chat_templates, minilora.jinja_template): each built-in against its model's
official Jinja template, token for token; "auto" over official and other templates; special tokens; truncation.

The references are the official templates' renders (transformers' apply_chat_template) tokenized whole with
`tokenizer(text, add_special_tokens=False)`, and the positions of the answers read back from those renders: nothing
here uses minilora's pieces to build what it checks. Tokenizers are built on the spot (nothing is downloaded): the
sentencepiece one of conftest.py for Llama 2, and tiny byte-level BPEs, as Llama 3 and Qwen2 use, with their
special tokens.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minilora.chat_templates import BUILTINS, CHATML, LLAMA2, PieceTemplate, Special, Text
from minilora.config import TrainConfig
from minilora.data import encoded
from minilora.jinja_template import JinjaTemplate
from minilora.model import load_tokenizer
from minilora.conversation import parse_text
from minilora.template import IGNORE, encode_chat, encode_prompt, encode_rows, get_template, render_chat, stop_ids

# ---------------------------------------------------------------- the official templates, as their models ship them

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json
LLAMA2_CHAT = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""  # noqa: E501

# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
LLAMA3_INSTRUCT = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""  # noqa: E501

# plain ChatML, as transformers' chat-templating docs and many ChatML fine-tunes write it
CHATML_PLAIN = r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""  # noqa: E501

# Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json: ChatML with a default system prompt, and tool calls
QWEN25_INSTRUCT = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Rewrites earlier turns: the system prompt goes into the last user message, as Mistral's later templates do.
SYSTEM_LAST = r"""{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}{%- set loop_messages = messages[1:] if system else messages %}{%- set last_user = loop_messages | selectattr('role', 'equalto', 'user') | list | last %}{%- for m in loop_messages %}{%- if m['role'] == 'user' %}{{ '<|im_start|>user\n' + (system + '\n\n' if system and m is sameas last_user else '') + m['content'] + '<|im_end|>\n' }}{%- else %}{{ '<|im_start|>assistant\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"""  # noqa: E501

# Writes today's date in its system header, as Llama 3.1 to 3.3 do: from the clock (transformers' strftime_now)
# unless the caller gives date_string.
LLAMA31_DATED = r"""{%- if date_string is not defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}{{- bos_token + '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '\n\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim }}{%- set messages = messages[1:] %}{%- endif %}{{- '<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""  # noqa: E501

GENERATION_PROMPT = {"llama2": "[/INST]", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "chatml": "<|im_start|>assistant\n"}
MARKER = {"llama2": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}

# ---------------------------------------------------------------- tiny byte-level BPE tokenizers

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["The quick brown fox jumps over the lazy dog, said the teacher. What is the capital of France?",
          "user\n\nassistant\n\nsystem\n\nYou are a helpful assistant. Answer briefly!\n",
          "Привет! Как дела? Я изучаю машинное обучение.", "你好，世界。我们正在训练一个小的语言模型。",
          "¿Cómo estás? It's 1234 o'clock; we'll see 😀 🤖", "def f(x):\n    return x * 2  # twice\n\n"] * 10


def byte_bpe(split: str, specials: list, chat_template: str | None, **special_roles) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS with `split` as its pre-tokenizer regex, `specials` added as special
    tokens, wrapped as transformers wraps Llama 3's and Qwen2's tokenizer.json."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **special_roles)
    tok.chat_template = chat_template
    return tok


def llama3_tokenizer(chat_template=LLAMA3_INSTRUCT):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return byte_bpe(LLAMA3_SPLIT, specials, chat_template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen_tokenizer(chat_template=CHATML_PLAIN):  # no BOS, as Qwen2's tokenizers
    return byte_bpe(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], chat_template,
                    eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def toks(tok_dir):
    """A tokenizer per built-in, each carrying its model's official chat template."""
    llama2 = load_tokenizer(tok_dir)  # a fresh one: the shared fixture keeps no chat template
    llama2.chat_template = LLAMA2_CHAT
    return {"llama2": llama2, "llama3": llama3_tokenizer(), "chatml": qwen_tokenizer()}


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer(QWEN25_INSTRUCT)


# ---------------------------------------------------------------- conversations with fresh random content

SPECIAL_TEXTS = ["<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "cat", "sat", "on", "mat", "Paris", "France?", "user", "assistant\n", "[INST]", "<<SYS>>", "\n\n",
         "  ", "\t", "😀", "中文", "Привет", "It's", "1234", "x * 2", "<|im_start", "</"]
# any character but surrogates and "▁" (sentencepiece's space symbol, which decodes to " ")
piece = st.one_of(st.text(st.characters(exclude_characters="\u2581", exclude_categories=["Cs"]), min_size=1,
                          max_size=8), st.sampled_from(WORDS))
content = (st.lists(piece, min_size=1, max_size=6).map(" ".join).map(str.strip)
           .filter(lambda s: s and not any(t in s for t in SPECIAL_TEXTS)))  # the whole render would read those
conversations = st.tuples(st.one_of(st.none(), content), st.lists(st.tuples(content, content), min_size=1, max_size=3))


def messages(system, pairs):
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        turns += [{"role": "user", "content": user}] + ([] if assistant is None else
                                                         [{"role": "assistant", "content": assistant}])
    return turns


def official_ids(tok, turns, generation=False, name=None):
    """The official render tokenized whole. Llama 2's writes ' </s>': sentencepiece makes that space a lone '▁'
    token, which minilora's llama2 encoding (which must not change: tests/test_data.py pins it) leaves out, since
    it encodes each answer on its own and puts EOS in as an id; those pieces are removed."""
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if name == "llama2":
        lone = tok.convert_tokens_to_ids("▁")
        ids = [i for k, i in enumerate(ids) if not (i == lone and ids[k + 1:k + 2] == [tok.eos_token_id])]
    return ids


def supervised_runs(labels):
    """[(start, end)] of each stretch of supervised positions."""
    runs, start = [], None
    for k, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = k
        elif label == IGNORE and start is not None:
            runs.append((start, k))
            start = None
    return runs


def check_supervised(tok, name, turns, ex):
    """Labels are the ids on exactly the assistants' contents and their end-of-turn markers: one run per answer,
    right after the generation prompt, decoding to the answer and the marker."""
    marker, prompt_end = MARKER[name], GENERATION_PROMPT[name]
    answers = [t["content"] for t in turns if t["role"] == "assistant"]
    runs = supervised_runs(ex["labels"])
    assert len(runs) == len(answers)
    assert all(ex["labels"][k] in (IGNORE, ex["input_ids"][k]) for k in range(len(ex["labels"])))
    for (s, e), answer in zip(runs, answers):
        assert tok.decode(ex["input_ids"][:s]).endswith(prompt_end)
        assert ex["input_ids"][e - 1] == tok.convert_tokens_to_ids(marker)
        got = tok.decode(ex["input_ids"][s:e - 1])
        assert (got.strip() if name == "llama2" else got) == answer  # sentencepiece decodes its dummy "▁" as " "


# ---------------------------------------------------------------- the built-ins against the official templates

@pytest.mark.parametrize("name", list(BUILTINS))
@settings(max_examples=40, deadline=None)
@given(conv=conversations)
def test_builtin_equals_official_template(toks, name, conv):
    tok, turns = toks[name], messages(*conv)
    ex = encode_chat(turns, tok, max_len=10**6, template=name)
    assert ex["input_ids"] == official_ids(tok, turns, name=name)
    check_supervised(tok, name, turns, ex)
    assert render_chat(turns, name) == tok.apply_chat_template(turns, tokenize=False)
    # auto over the official template is the built-in
    assert get_template("auto", tok) is BUILTINS[name]
    assert encode_chat(turns, tok, max_len=10**6) == ex
    # and the generic path (prefix renders, offsets) reads the official template as the built-in writes it
    if name != "llama2":  # whose official render has the lone "▁" before </s> (official_ids)
        assert encode_chat(turns, tok, max_len=10**6, template=JinjaTemplate(tok).probed()) == ex


@pytest.mark.parametrize("name", list(BUILTINS))
@settings(max_examples=20, deadline=None)
@given(conv=conversations, question=content)
def test_generation_prompt(toks, name, conv, question):
    tok = toks[name]
    system, pairs = conv
    ids = encode_prompt(messages(system, pairs + [(question, None)]), tok, template=name)
    assert ids == official_ids(tok, messages(system, pairs + [(question, None)]), generation=True, name=name)
    assert tok.decode(ids).endswith(GENERATION_PROMPT[name])
    # the prompt, then the answer and what follows it, is the whole conversation
    full = encode_chat(messages(system, pairs + [(question, "Fine.")]), tok, max_len=10**6, template=name)
    assert full["input_ids"][:len(ids)] == ids and full["labels"][len(ids) - 1] == IGNORE
    assert full["labels"][len(ids)] != IGNORE  # the answer starts right after the generation prompt


def test_stop_ids(toks):
    ids = {name: [toks[name].convert_ids_to_tokens(i) for i in stop_ids(toks[name], name)] for name in BUILTINS}
    assert ids == {"llama2": ["</s>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"],
                   "chatml": ["<|im_end|>", "<|endoftext|>"]}


def test_special_token_text_in_content_stays_text(toks, qwen):
    """A message that holds '<|im_end|>' or '<|eot_id|>' as text gets no end-of-turn id from it, under every
    template, the generic one included."""
    turns = messages("say <|eot_id|> or <|im_end|>", [("what is <|im_start|>user?", "it is </s> <|im_end|>"),
                                                      ("and <|begin_of_text|>", "a token")])
    for name, tok in [*toks.items(), ("auto", qwen)]:
        ex = encode_chat(turns, tok, max_len=10**6, template=name)
        marker = MARKER.get(name, "<|im_end|>")
        assert ex["input_ids"].count(tok.convert_tokens_to_ids(marker)) == (2 if name == "llama2" else 5)
        assert [tok.decode(ex["input_ids"][s:e - 1]).strip() for s, e in supervised_runs(ex["labels"])] == \
            ["it is </s> <|im_end|>", "a token"]


tricky = (st.lists(st.one_of(piece, st.sampled_from(SPECIAL_TEXTS)), min_size=1, max_size=6).map(" ".join)
          .map(str.strip).filter(bool))


@settings(max_examples=30, deadline=None)
@given(system=tricky, pairs=st.lists(st.tuples(tricky, tricky), min_size=1, max_size=3))
def test_generic_path_reads_special_token_text_as_text(toks, qwen, system, pairs):
    """Contents that hold special tokens' text: the generic path, which tokenizes the render whole and then reads
    such contents again as text, gives the ids of the built-ins, which encode every content as text. (With a system
    prompt Qwen2.5's template renders as ChatML does.)"""
    turns = messages(system, pairs)
    for tok, name in [(qwen, "chatml"), (toks["llama3"], "llama3")]:
        generic = JinjaTemplate(tok).probed()
        assert encode_chat(turns, tok, 10**6, template=generic) == encode_chat(turns, tok, 10**6, template=name)


# ---------------------------------------------------------------- auto over other templates

@settings(max_examples=40, deadline=None)
@given(conv=conversations)
def test_auto_over_qwen25_adds_its_default_system_prompt(qwen, conv):
    turns = messages(*conv)
    template = get_template("auto", qwen)
    assert isinstance(template, JinjaTemplate) and template not in BUILTINS.values()
    ex = encode_chat(turns, qwen, max_len=10**6)
    assert ex["input_ids"] == official_ids(qwen, turns)
    check_supervised(qwen, "chatml", turns, ex)  # the answers and <|im_end|>; the "\n" after it is not supervised
    if conv[0] is None:
        assert qwen.decode(ex["input_ids"]).startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")
    assert [qwen.convert_ids_to_tokens(i) for i in stop_ids(qwen)] == ["<|im_end|>", "<|endoftext|>"]
    prompt = messages(conv[0], conv[1] + [("Go on.", None)])
    assert encode_prompt(prompt, qwen) == official_ids(qwen, prompt, generation=True)


def test_the_template_names():
    import minilora as ml

    assert ml.TEMPLATES == ("auto", "llama2", "llama3", "chatml")


def test_auto_without_a_chat_template_is_llama2(tokenizer):
    assert tokenizer.chat_template is None and get_template("auto", tokenizer) is LLAMA2
    assert get_template() is LLAMA2 and render_chat([{"role": "user", "content": "q"}]) == "<s>[INST] q [/INST]"
    qwen_plain = qwen_tokenizer(chat_template=None)  # no BOS: llama2 refuses it, and says what to pass
    refusal = (r"^template 'llama2' needs the tokenizer's BOS token, and the tokenizer '[^']+' has none \(Qwen2 has "
               r"no BOS\); pass .*template='chatml' for Qwen2")
    with pytest.raises(ValueError, match=refusal) as e:
        encode_chat(messages(None, [("q", "a")]), qwen_plain)
    assert "\n" not in str(e.value)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = qwen_tokenizer(SYSTEM_LAST)
    with pytest.raises(ValueError, match=r"^template 'auto': .* rewrites earlier turns when a turn is added .*; pass "
                                         r"template='llama2', 'llama3' or 'chatml' instead$") as e:
        encode_rows([messages("be brief", [("q", "a"), ("q2", "a2")])], tok)
    assert "\n" not in str(e.value)


def test_a_template_that_refuses_a_row_makes_it_malformed():
    """A template that raises on system prompts (as Mistral's first one does) still reads the other rows."""
    no_system = CHATML_PLAIN.replace("{% for message", "{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                                     "'no system prompts') }}{% endif %}{% for message")
    tok = qwen_tokenizer(no_system)  # it renders the probes with a system prompt as ChatML does not: generic path
    rows = [messages(None, [("q", "a")]), messages("sys", [("q", "a")]), messages(None, [("q2", "a2")])]
    examples, stats = encode_rows(rows, tok, skip_malformed=True)
    assert len(examples) == 2 and stats.malformed == [(1, "the tokenizer's chat template refuses it (no system "
                                                          "prompts)")]


def test_auto_over_chatml_on_a_sentencepiece_tokenizer_is_the_official_render(tok_dir):
    """ChatML's tokens added to a sentencepiece tokenizer (as ChatML fine-tunes of Mistral do): the built-in would
    read each piece of text with a dummy "▁" prefix, unlike the render tokenized whole, so auto reads the template
    itself, and its ids are the official render's."""
    tok = load_tokenizer(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_PLAIN
    turns = messages("Be brief.", [("What is the capital of France?", "Paris."), ("And Spain?", "Madrid.")])
    assert isinstance(get_template("auto", tok), JinjaTemplate)
    ex = encode_chat(turns, tok)
    assert ex["input_ids"] == official_ids(tok, turns) != encode_chat(turns, tok, template="chatml")["input_ids"]
    assert [tok.decode(ex["input_ids"][s:e]).strip() for s, e in supervised_runs(ex["labels"])] == \
        ["Paris.<|im_end|>", "Madrid.<|im_end|>"]


def test_generic_path_over_llama2_official_template(toks):
    """Forced onto the generic path, Llama 2's official template gives its render tokenized whole (the lone '▁'
    before each </s> included, and supervised with the answer: it is in the answer's characters' reach)."""
    tok = toks["llama2"]
    turns = messages("Be brief.", [("What is the capital of France?", "Paris."), ("And Spain?", "Madrid.")])
    template = JinjaTemplate(tok).probed()
    assert template.markers == ["</s>"] and template.stop_ids(tok) == [tok.eos_token_id]
    ex = encode_chat(turns, tok, template=template)
    text = tok.apply_chat_template(turns, tokenize=False)
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert [tok.decode(ex["input_ids"][s:e]) for s, e in supervised_runs(ex["labels"])] == ["Paris. </s>",
                                                                                            "Madrid. </s>"]


# ---------------------------------------------------------------- special tokens the tokenizer lacks

@pytest.mark.parametrize("name,tok_of,token", [("llama3", "chatml", "<|begin_of_text|>"),
                                               ("chatml", "llama3", "<|im_start|>"),
                                               ("chatml", "llama2", "<|im_start|>")])
def test_a_missing_special_token_is_named(toks, name, tok_of, token):
    with pytest.raises(ValueError, match=rf"^template '{name}' needs the special token '{token}', which the "
                                         r"tokenizer '[^']+' lacks; pass the template its model was trained with") as e:
        encode_chat(messages(None, [("q", "a")]), toks[tok_of], template=name)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- rows, truncation, config

def test_guanaco_text_rows_render_in_any_template(toks):
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] And you? [/INST] Fine. </s>"
    for name, tok in toks.items():
        assert encode_chat(text, tok, template=name) == encode_chat(parse_text(text), tok, template=name)
        assert render_chat(text, name) == tok.apply_chat_template(parse_text(text), tokenize=False)


LONG = " ".join(["The quick brown fox jumps over the lazy dog, said the teacher."] * 12)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_truncation_keeps_the_rules(toks, name):
    tok = toks[name]
    first_id = tok.convert_tokens_to_ids({"llama3": "<|begin_of_text|>", "chatml": "<|im_start|>"}[name])
    # 1. the earliest whole turns go first, the system prompt moving along
    pairs = [("Write a haiku about the sea.", "Waves fold into foam."), ("Now a fox.", "The quick brown fox."),
             ("Thanks!", "You are welcome.")]
    full = encode_chat(messages("Be brief.", pairs), tok, template=name)
    last_two = encode_chat(messages("Be brief.", pairs[1:]), tok, template=name)
    ex = encode_chat(messages("Be brief.", pairs), tok, max_len=len(last_two["input_ids"]), template=name)
    assert len(last_two["input_ids"]) < len(full["input_ids"]) and ex["truncated"]
    assert (ex["input_ids"], ex["labels"]) == (last_two["input_ids"], last_two["labels"])
    assert tok.decode(ex["input_ids"]).count("Be brief.") == 1
    # 2. a long prompt loses its head, its first id stays; the answer and what follows it stay whole
    ex = encode_chat(messages(None, [(LONG, "Paris.")]), tok, max_len=40, template=name)
    whole = encode_chat(messages(None, [(LONG, "Paris.")]), tok, template=name)
    assert ex["truncated"] and len(ex["input_ids"]) == 40 and ex["input_ids"][0] == first_id
    n = len(whole["input_ids"])
    assert ex["input_ids"][1:] == whole["input_ids"][n - 39:] and ex["labels"][1:] == whole["labels"][n - 39:]
    assert tok.decode(ex["input_ids"]).endswith(GENERATION_PROMPT[name] + "Paris." + MARKER[name]
                                                + ("\n" if name == "chatml" else ""))
    # 3. a long answer is cut once the prompt is down to a quarter of max_len, its marker with it
    ex = encode_chat(messages(None, [(LONG, LONG)]), tok, max_len=64, template=name)
    assert len(ex["input_ids"]) == 64 and ex["labels"].count(IGNORE) == 16 and ex["input_ids"][0] == first_id
    assert tok.decode(ex["input_ids"][:16]).endswith(GENERATION_PROMPT[name])
    assert ex["input_ids"][16:] == tok.encode(LONG, add_special_tokens=False)[:48]


def test_empty_answers_supervise_their_marker(toks):
    for name in ("llama3", "chatml"):
        tok = toks[name]
        turns = messages(None, [("Say nothing.", ""), ("Now say hi.", "hi")])
        examples, stats = encode_rows([turns], tok, template=name)
        assert examples[0]["input_ids"] == official_ids(tok, turns)
        assert [examples[0]["labels"][s:e] for s, e in supervised_runs(examples[0]["labels"])][0] == \
            [tok.convert_tokens_to_ids(MARKER[name])]
        assert (stats.empty_answers, stats.template) == (1, name)


def test_config_and_encoded_examples_name_the_template(toks, tokenizer):
    assert TrainConfig(template="chatml").template == "chatml"
    with pytest.raises(ValueError, match=r"template='qwen'; use one of \['auto', 'llama2', 'llama3', 'chatml'\]"):
        TrainConfig(template="qwen")
    data = encode_rows([messages(None, [("q", "a")])], toks["llama3"], template="llama3")
    assert encoded(data, toks["llama3"], 64, template="auto") is data  # auto is llama3 for this tokenizer
    with pytest.raises(ValueError, match=r"encoded with template 'llama3', and template='auto' is 'llama2'"):
        encoded(data, tokenizer, 64)
    with pytest.raises(ValueError, match=r"template='vicuna'; pass 'auto'"):
        get_template("vicuna")
    assert json.dumps(data[1].record())  # metrics.jsonl's first line carries the template's name


def test_a_template_of_ones_own(toks):
    """A new template is a few pieces: here Zephyr's, on the Llama 3 tokenizer's special tokens."""
    eot = Special("<|eot_id|>")
    zephyr = PieceTemplate("zephyr", lambda system, q, first: (
        [Text(f"<|system|>\n{system}")] + [eot, Text("\n")] if system else []) + [Text(f"<|user|>\n{q}"), eot,
                                                                                  Text("\n<|assistant|>\n")],
        lambda a: [Text(a), eot], after=(Text("\n"),), stops=(eot,))
    tok = toks["llama3"]
    turns = messages("Be brief.", [("Hi", "Hello!")])
    ex = encode_chat(turns, tok, template=zephyr)
    assert render_chat(turns, zephyr) == ("<|system|>\nBe brief.<|eot_id|>\n<|user|>\nHi<|eot_id|>\n<|assistant|>\n"
                                          "Hello!<|eot_id|>\n")
    assert [tok.decode(ex["input_ids"][s:e]) for s, e in supervised_runs(ex["labels"])] == ["Hello!<|eot_id|>"]
    assert stop_ids(tok, zephyr) == [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert CHATML.render(None, [("q", None)]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_writes_the_date_encodes_the_day_it_is_given(monkeypatch):
    """Encoded examples do not change with the day: encode_rows dates a template that writes the date with today
    (DataStats.day), and a template dated another day writes that day, whatever the clock says."""
    from datetime import datetime

    import minilora.template

    tok = llama3_tokenizer(LLAMA31_DATED)
    auto = get_template("auto", tok)
    assert isinstance(auto, JinjaTemplate) and auto.day is None  # the date header makes it no built-in
    pairs = [("Hi", "Hello!")]
    assert f"Today Date: {datetime.now():%d %b %Y}\n" in auto.render(None, pairs)  # undated: the clock's day
    assert "Today Date: 26 Jul 2024\n" in auto.dated("2024-07-26").render(None, pairs)
    rows = [messages(None, [("What is 2 + 2?", "It is 4.")])]
    monkeypatch.setattr(minilora.template, "today", lambda: "2026-12-07")
    first, stats = encode_rows(rows, tok)
    assert stats.day == stats.record()["day"] == "2026-12-07" and "dated 2026-12-07" in stats.summary(64)
    monkeypatch.setattr(minilora.template, "today", lambda: "2026-12-08")
    assert encode_rows(rows, tok)[0] != first  # a day later the header's ids differ
    assert encode_rows(rows, tok, template=auto.dated("2026-12-07")) == (first, stats)
    with pytest.raises(ValueError, match=r"date 2026-12-07, and the run they resume began on 2026-12-08; encode_rows "
                                         r"with template=get_template\('auto', tokenizer\).dated\('2026-12-08'\)"):
        encoded((first, stats), tok, 64, day="2026-12-08")
    with pytest.raises(ValueError, match=r"dated\('07/12/2026'\): pass the day as 'YYYY-MM-DD'"):
        auto.dated("07/12/2026")
    # Mistral Small 3 reads the clock whatever it is given; a macro of the template's own reads it too
    for clock in ['{%- set today = strftime_now("%Y-%m-%d") %}', '{%- macro today() %}{{ strftime_now( "%Y-%m-%d" ) '
                  '}}{% endmacro %}{%- set today = today() %}']:
        mistral = JinjaTemplate(qwen_tokenizer(clock + "[{{ today }}]" + CHATML_PLAIN))
        assert mistral.dated("2024-07-26").render(None, pairs).startswith("[2024-07-26]<|im_start|>user\nHi")
    # one that computes its format cannot be given a day; one without a clock, and a built-in, write no date
    for unpinned in [JinjaTemplate(qwen_tokenizer('{{ strftime_now("%Y" + "-%m") }}' + CHATML_PLAIN)),
                     JinjaTemplate(qwen_tokenizer(QWEN25_INSTRUCT))]:
        assert unpinned.dated("2026-12-07") is unpinned
    assert LLAMA2.dated("2026-12-07") is LLAMA2 and encode_rows(rows, tok, template="llama3")[1].day == ""
