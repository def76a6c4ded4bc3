"""minilora.template and minilora.data: template and parsing, ids and labels, truncation, padded and packed
collation, batching, loading, and the inspect CLI (minilora.__main__).

The expected ids are rebuilt here from the template's definition (BOS id, "[INST] ... [/INST]" encoded, the
answer encoded on its own, EOS id), independently of template.py's helpers.
"""

import codecs
import csv
import io
import json
import random
import runpy
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from minilora.data import Collator, batches, check_eval_size, load_rows, packs, split_eval
from minilora.kernels.attention import segment_mask
from minilora.conversation import MalformedRow, parse_text
from minilora.template import IGNORE, SkipExample, encode_chat, encode_prompt, encode_rows, render_chat
from minilora.tiny import instruction_rows, tiny_config

SYSTEM = "You are a helpful assistant."
CONVERSATIONS = {
    "single": [("What is the capital of France?", "Paris.")],
    "multi": [("Write a haiku about the sea.", "Waves fold into foam,\nsalt wind carries gull voices."),
              ("Now one about a fox.", "The quick brown fox\njumps over the lazy dog."),
              ("Thanks!", "You are welcome.")],
    "non_latin": [("Привет! Как дела?", "Я изучаю машинное обучение 🤖."),
                  ("你好，世界。", "我们正在训练一个小的语言模型。🌊 ok")],
}


def messages(pairs, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


def expected(tok, turns):
    """(ids, labels, answers) straight from the template: the reference the encoder must match."""
    enc = lambda s: tok.encode(s, add_special_tokens=False, split_special_tokens=True)  # noqa: E731
    system = turns[0]["content"].strip() if turns[0]["role"] == "system" else ""
    rest = turns[1:] if turns[0]["role"] == "system" else turns
    ids, labels, answers = [], [], []
    for k in range(0, len(rest), 2):
        user, answer = rest[k]["content"].strip(), rest[k + 1]["content"].strip()
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if k == 0 and system else ""
        prompt = [tok.bos_token_id] + enc(f"[INST] {sys_block}{user} [/INST]")
        target = enc(answer) + [tok.eos_token_id]
        ids += prompt + target
        labels += [IGNORE] * len(prompt) + target
        answers.append(answer)
    return ids, labels, answers


def check_example(tok, turns, ex):
    ids, labels, answers = expected(tok, turns)
    assert ex["input_ids"] == ids  # so every user/system position is where the template puts it ...
    assert ex["labels"] == labels  # ... and carries -100
    assert ex["input_ids"].count(tok.bos_token_id) == len(answers)
    assert ex["input_ids"].count(tok.eos_token_id) == len(answers)  # no EOS injected by user text
    supervised = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE]
    assert supervised == [label for label in ex["labels"] if label != IGNORE]  # label = id where supervised
    assert supervised[-1] == tok.eos_token_id
    chunks, cur = [], []
    for i in supervised:
        if i == tok.eos_token_id:
            chunks.append(cur)
            cur = []
        else:
            cur.append(i)
    assert [tok.decode(c) for c in chunks] == answers


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_masking_and_roundtrip(tokenizer, name, system):
    turns = messages(CONVERSATIONS[name], system)
    ex = encode_chat(turns, tokenizer)
    check_example(tokenizer, turns, ex)
    assert not ex["truncated"]
    pieces = "".join(tokenizer.convert_ids_to_tokens(ex["input_ids"]))
    assert pieces.count("<s>") == pieces.count("</s>") == len(CONVERSATIONS[name])  # literal ones would add
    text = render_chat(turns)
    assert text.startswith("<s>[INST] ") and text.endswith(" </s>")
    assert parse_text(text) == turns
    for row in (text, {"text": text}, {"messages": turns}, text.replace("<s>", "")):  # <s> may be absent
        assert encode_chat(row, tokenizer) == ex


def test_parse_is_lenient_about_whitespace():
    text = "  [INST]<<SYS>>\n sys \n<</SYS>>\nq1[/INST]a1</s>\n<s> [INST]\tq2 [/INST]\n a2\n</s>  "
    assert parse_text(text) == [{"role": "system", "content": "sys"}] + messages([("q1", "a1"), ("q2", "a2")])


def test_encode_prompt_ends_with_inst(tokenizer):
    turns = messages(CONVERSATIONS["multi"], SYSTEM)
    full = encode_chat(turns, tokenizer)["input_ids"]
    prompt = encode_prompt(turns[:-1], tokenizer)
    answer = tokenizer.encode(turns[-1]["content"], add_special_tokens=False)
    assert prompt + answer + [tokenizer.eos_token_id] == full
    assert tokenizer.decode(prompt).endswith("Thanks! [/INST]")
    assert encode_prompt(render_chat(turns[:-1]), tokenizer) == prompt  # "... </s><s>[INST] Thanks! [/INST]"
    with pytest.raises(MalformedRow, match="last turn is an answer"):
        encode_prompt(turns, tokenizer)


# Random content: any character but surrogates and "▁" (sentencepiece's space symbol, which decodes to " "
# in every LLaMA tokenizer), mixed with strings that look like markers or special tokens.
TRICKY = ["[INST]", "[/INST]", "<s>", "</s>", "<<SYS>>", "<</SYS>>", "<unk>", " ", "\n", "\t", "  \n ", "😀", "中文"]
content = st.lists(st.one_of(st.text(st.characters(exclude_characters="\u2581", exclude_categories=["Cs"]),
                                     min_size=1, max_size=8), st.sampled_from(TRICKY)),
                   min_size=1, max_size=5).map("".join).filter(lambda s: s.strip())
conversation = st.tuples(st.one_of(st.none(), content), st.lists(st.tuples(content, content), min_size=1, max_size=3))


@settings(max_examples=60, deadline=None)
@given(conversation)
def test_masking_property(tokenizer, conv):
    system, pairs = conv
    turns = messages(pairs, system)
    ex = encode_chat(turns, tokenizer, max_len=10**6)
    check_example(tokenizer, turns, ex)
    if not any(m in t["content"] for t in turns for m in TRICKY[:6]):  # markers in content can't round-trip
        stripped = [{"role": t["role"], "content": t["content"].strip()} for t in turns]
        assert parse_text(render_chat(turns)) == stripped
        assert encode_chat(render_chat(turns), tokenizer, max_len=10**6) == ex


# Empty questions and answers, as a few guanaco rows have, at any position of a conversation.
maybe_empty = st.one_of(content, st.sampled_from(["", " ", "\n "]))


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.none(), content), st.lists(st.tuples(maybe_empty, maybe_empty), min_size=1, max_size=4))
def test_empty_turns_property(tokenizer, system, pairs):
    turns = messages(pairs, system)
    ex = encode_chat(turns, tokenizer, max_len=10**6)
    check_example(tokenizer, turns, ex)  # ids as the template writes them; each answer + EOS supervised
    eos_alone = [k for k in range(1, len(ex["labels"])) if ex["labels"][k] == tokenizer.eos_token_id
                 and ex["labels"][k - 1] == IGNORE]  # a supervised run that is EOS alone
    assert len(eos_alone) == sum(not a.strip() for _, a in pairs)
    examples, stats = encode_rows([turns], tokenizer, max_len=10**6)
    assert examples == [ex] and stats.turns == len(pairs)
    assert stats.empty_questions == sum(not q.strip() for q, _ in pairs)
    assert stats.empty_answers == sum(not a.strip() for _, a in pairs)
    if not any(m in t["content"] for t in turns for m in TRICKY[:6]):  # the guanaco text form says the same
        stripped = [{"role": t["role"], "content": t["content"].strip()} for t in turns]
        assert parse_text(render_chat(turns)) == stripped
        assert encode_chat(render_chat(turns), tokenizer, max_len=10**6) == ex


def test_guanaco_rows_with_empty_turns(tokenizer):
    """The forms met in guanaco-llama2-1k: a middle turn with an empty question, a turn with an empty answer."""
    empty_q = "<s>[INST] Hi [/INST] Hello! </s><s>[INST]  [/INST] Anything else? </s><s>[INST] No [/INST] Bye. </s>"
    empty_a = "<s>[INST] Say nothing. [/INST]  </s>"
    assert render_chat(parse_text(empty_q)) == empty_q and render_chat(parse_text(empty_a)) == empty_a
    check_example(tokenizer, messages([("Hi", "Hello!"), ("", "Anything else?"), ("No", "Bye.")]),
                  encode_chat(empty_q, tokenizer))
    ex = encode_chat(empty_a, tokenizer)
    assert [label for label in ex["labels"] if label != IGNORE] == [tokenizer.eos_token_id]
    assert tokenizer.decode(ex["input_ids"][1:-1]) == "[INST] Say nothing. [/INST]"
    # without </s> the last question is still a prompt for generation, not an empty answer
    assert encode_prompt("<s>[INST] Say nothing. [/INST]", tokenizer) == ex["input_ids"][:-1]
    _, stats = encode_rows([empty_q, empty_a, GOOD], tokenizer)
    assert (stats.turns, stats.empty_questions, stats.empty_answers) == (5, 1, 1)


def test_split_special_tokens_is_needed(tokenizer):
    """The trap the encoder avoids: by default HF turns a literal "</s>" in text into the EOS id."""
    assert tokenizer.eos_token_id in tokenizer.encode("a </s> b", add_special_tokens=False)
    ex = encode_chat(messages([("say </s><s> now", "ok </s>")]), tokenizer)
    assert ex["input_ids"].count(tokenizer.eos_token_id) == 1 and ex["input_ids"].count(tokenizer.bos_token_id) == 1


# ---------------------------------------------------------------- collation

def test_pad_equal_to_eos_keeps_eos_labels(tokenizer):
    eos = tokenizer.eos_token_id
    examples = [encode_chat(messages(p), tokenizer) for p in CONVERSATIONS.values()]
    batch = Collator(pad_id=eos, pad_to_multiple_of=8)(examples)
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(lengths)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, (ex, n) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][b, :n].tolist() == ex["input_ids"]
        assert batch["labels"][b, :n].tolist() == ex["labels"]
        assert batch["labels"][b, n - 1] == eos  # the real EOS is supervised although pad == eos
        assert (batch["labels"][b, n:] == IGNORE).all() and (batch["input_ids"][b, n:] == eos).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["attention_mask"] == 0).any()  # some row was padded, so the checks above bit


# ---------------------------------------------------------------- truncation

LONG_Q = " ".join(["The quick brown fox jumps over the lazy dog, said the teacher."] * 8)


def test_long_prompt_keeps_whole_answer(tokenizer):
    ex = encode_chat(messages([(LONG_Q, "Paris.")]), tokenizer, max_len=32)
    assert ex["truncated"] and len(ex["input_ids"]) == 32 and ex["input_ids"][0] == tokenizer.bos_token_id
    answer = tokenizer.encode("Paris.", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ex["input_ids"][-len(answer):] == ex["labels"][-len(answer):] == answer
    assert sum(label != IGNORE for label in ex["labels"]) == len(answer)
    assert tokenizer.decode(ex["input_ids"][1:-len(answer)]).endswith("teacher. [/INST]")  # the prompt's tail


def test_long_answer_is_cut_after_a_quarter_of_prompt(tokenizer):
    ex = encode_chat(messages([(LONG_Q, LONG_Q)]), tokenizer, max_len=64)
    assert len(ex["input_ids"]) == 64 and ex["labels"].count(IGNORE) == 16  # BOS + 15 prompt tokens
    assert tokenizer.eos_token_id not in ex["input_ids"]  # the answer's tail, EOS included, is gone
    assert tokenizer.decode(ex["input_ids"][1:16]).endswith("[/INST]")
    assert tokenizer.decode(ex["input_ids"][16:]) == tokenizer.decode(
        tokenizer.encode(LONG_Q, add_special_tokens=False)[:48])


def test_multi_turn_drops_earliest_turns_first(tokenizer):
    pairs = CONVERSATIONS["multi"]
    turns = messages(pairs, SYSTEM)
    full = encode_chat(turns, tokenizer)
    last_two = encode_chat(messages(pairs[1:], SYSTEM), tokenizer)  # the system prompt moves along
    assert len(last_two["input_ids"]) < len(full["input_ids"])
    ex = encode_chat(turns, tokenizer, max_len=len(last_two["input_ids"]))
    assert ex["truncated"] and ex["input_ids"] == last_two["input_ids"] and ex["labels"] == last_two["labels"]
    assert ex["input_ids"].count(tokenizer.bos_token_id) == 2


def test_no_room_for_an_answer_is_skipped_and_counted(tokenizer):
    rows = [render_chat(messages(p)) for p in CONVERSATIONS.values()]
    with pytest.raises(SkipExample, match="no room for an answer"):
        encode_chat(rows[0], tokenizer, max_len=1)
    with pytest.raises(ValueError, match=r"no example left out of 3 rows .*no room for an answer': 3"):
        encode_rows(rows, tokenizer, max_len=1)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tokenizer), attn_implementation="sdpa")).float().eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def test_survivors_train_with_finite_loss(tokenizer, tiny_model):
    rows = [render_chat(messages([(LONG_Q, "Paris.")])), {"messages": messages(CONVERSATIONS["multi"], SYSTEM)},
            "[INST] no answer here", {"text": render_chat(messages(CONVERSATIONS["non_latin"]))}]
    examples, stats = encode_rows(rows, tokenizer, max_len=40, skip_malformed=True)
    assert stats.rows == 4 and len(examples) == 3 and stats.skipped == {"no [/INST]": 1}
    assert stats.truncated == 3 and stats.tokens == sum(len(ex["input_ids"]) for ex in examples)
    assert stats.turns == sum(ex["input_ids"].count(tokenizer.bos_token_id) for ex in examples) >= 3
    assert stats.supervised == sum(sum(label != IGNORE for label in ex["labels"]) for ex in examples) > 0
    with torch.no_grad():
        loss = tiny_model(**Collator(pad_id=tokenizer.pad_token_id)(examples)).loss
    assert torch.isfinite(loss) and loss > 1.0  # a random model on 512 tokens: about ln(512) = 6.2


def test_encode_rows_takes_a_datasets_dataset(tokenizer):
    import datasets

    texts = [render_chat(messages(p)) for p in CONVERSATIONS.values()]
    ds = datasets.Dataset.from_list([{"text": t, "id": i} for i, t in enumerate(texts)])
    assert encode_rows(ds, tokenizer)[0] == encode_rows(texts, tokenizer)[0]


# ---------------------------------------------------------------- packing

def test_packing_matches_one_by_one(tokenizer, tiny_model):
    """The examples of one packed row, through transformers' layers with the row's segment mask and position ids,
    give each example's logits and its loss alone: fp32, the same math on other shapes, 1e-5."""
    convs = [messages(p, s) for p in CONVERSATIONS.values() for s in (None, SYSTEM)]
    examples = [encode_chat(t, tokenizer) for t in convs]
    lengths = [len(ex["input_ids"]) for ex in examples]
    T = sum(lengths) + 2 * max(lengths) + 5  # room for three examples of padding
    batch = Collator(pad_id=tokenizer.pad_token_id, pack_tokens=T, max_len=max(lengths))(examples)
    starts = batch["segment_starts"]
    assert batch["input_ids"].shape == (1, T) and starts.dtype == torch.int32
    assert batch["segment_longest"] == max(lengths)
    assert starts[:len(examples) + 1].diff().tolist() == lengths and starts[-1] == T
    assert len(starts) - 1 == 16  # 6 examples and 3 of padding, rounded up to a power of two

    with torch.no_grad():
        mask = segment_mask(starts, T)
        packed = tiny_model(batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits[0]
        alone = [tiny_model(torch.tensor([ex["input_ids"]])).logits[0] for ex in examples]  # [(n, V)]
        naive = tiny_model(batch["input_ids"]).logits[0]  # the check below must be able to fail
    assert torch.isfinite(packed).all()  # padding queries attend to their own piece: no NaN
    worst = max((packed[a:a + len(r)] - r).abs().max().item() for a, r in zip(starts.tolist(), alone))
    naive_gap = max((naive[a:a + len(r)] - r).abs().max().item() for a, r in zip(starts.tolist(), alone))
    assert worst <= 1e-5, worst
    assert naive_gap > 1e-2  # attention across examples would change the logits a lot
    assert all(batch["labels"][0, a] == IGNORE for a in starts.tolist() if a < T)  # no label crosses a boundary

    def token_loss_sum(logits, labels):  # (n, V), (n,): unshifted, as HF does
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")

    n_sup = sum(sum(label != IGNORE for label in ex["labels"][1:]) for ex in examples)
    packed_loss = token_loss_sum(packed, batch["labels"][0]) / n_sup
    alone_loss = sum(token_loss_sum(a, torch.tensor(ex["labels"])) for a, ex in zip(alone, examples)) / n_sup
    assert n_sup == (batch["labels"][:, 1:] != IGNORE).sum()
    assert abs(packed_loss - alone_loss) <= 1e-5 * alone_loss, (packed_loss, alone_loss)


def test_a_packed_row_and_its_segments():
    ex = lambda n: {"input_ids": [1] + [5] * (n - 1), "labels": [IGNORE] + [5] * (n - 1)}  # noqa: E731
    batch = Collator(pad_id=0, pack_tokens=16, max_len=6)([ex(3), ex(6), ex(4)])
    assert batch["input_ids"].tolist() == [[1, 5, 5, 1, 5, 5, 5, 5, 5, 1, 5, 5, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["segment_starts"].tolist() == [0, 3, 9, 13, 16]  # the padding is an example of its own
    assert batch["labels"][0, 13:].tolist() == [IGNORE] * 3
    mask = segment_mask(batch["segment_starts"][:3], 9)[0, 0].int()  # the first two examples
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1]]
    # four examples and an 18-token padding cut at max_len: 7 in all, and an empty one makes 8
    batch = Collator(pad_id=0, pack_tokens=30, max_len=6)([ex(2), ex(3), ex(4), ex(3)])
    assert batch["segment_starts"].tolist() == [0, 2, 5, 9, 12, 18, 24, 30, 30]
    with pytest.raises(ValueError, match="do not pack into one row of pack_tokens=16"):
        Collator(pad_id=0, pack_tokens=16, max_len=6)([ex(6), ex(6), ex(6)])


def test_packs_hold_every_example_once_in_a_seeded_order():
    lengths = [random.Random(i).randint(5, 90) for i in range(300)]
    examples = [{"input_ids": [1] * n, "id": i} for i, n in enumerate(lengths)]
    groups = packs(examples, 256, seed=3, epoch=1)
    assert sorted(ex["id"] for g in groups for ex in g) == list(range(300))
    assert all(sum(len(ex["input_ids"]) for ex in g) <= 256 for g in groups)
    assert len(groups) <= 1.03 * sum(lengths) / 256 + 1  # first fit wastes little room
    assert groups == packs(examples, 256, seed=3, epoch=1) and groups != packs(examples, 256, seed=3, epoch=2)
    # examples of one length fill the packs in the order in which batches() batches them
    same = [{"input_ids": [1] * 10, "id": i} for i in range(40)]
    assert packs(same, 40, seed=5) == list(batches(same, 4, seed=5))
    with pytest.raises(ValueError, match="has 10 tokens, more than a pack's 8"):
        packs(same, 8)


# ---------------------------------------------------------------- malformed rows

GOOD = "<s>[INST] q [/INST] a </s>"
MALFORMED = [
    ("hello there", "no \\[/INST\\]"),
    ("<s>[INST] q [/INST] a </s> and more", "text after the last </s>"),
    ("<s>[INST] q [/INST] a </s> x <s>[INST] q [/INST] a </s>", "text between </s> and the next turn"),
    ("junk [INST] q [/INST] a </s>", "text before the first \\[INST\\]"),
    ("<s> junk [INST] q [/INST] a </s>", "text between <s> and \\[INST\\]"),
    ("<s>[INST] q [INST] r [/INST] a </s>", "unbalanced markers: expected \\[/INST\\] after the question"),
    ("<s>[INST] q [/INST] a [/INST] b </s>", "unbalanced markers: expected </s> after the answer, found \\[/INST\\]"),
    ("<s>[INST] q [/INST] a", "unbalanced markers: expected </s> after the answer, found the end"),
    ("<s>[INST] q [/INST] a </s></s>", "unbalanced markers: expected \\[INST\\] to open a turn, found </s>"),
    ("<s>[INST] <<SYS>>\nbe nice\n[/INST] a </s>", "<<SYS>> without <</SYS>>"),
    ("<s>[INST] q [/INST]", "the last question has no answer"),
    ([{"role": "assistant", "content": "a"}], "roles out of order: message 0 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "roles out of order: message 1"),
    (messages([("q", "a")]) + [{"role": "assistant", "content": "b"}], "roles out of order: message 2"),
    (messages([("q", "a")]) + [{"role": "system", "content": "s"}], "roles out of order: message 2 is 'system'"),
    ([{"role": "bot", "content": "q"}], "message 0 is not a"),
    ([{"role": "user", "content": None}], "message 0 is not a"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ({"prompt": "q"}, r"a row with neither 'text' nor 'messages' \(its fields are \['prompt'\]\)"),
    ({"text": None, "messages": None, "id": 7}, r"a row with neither .* \(its fields are \['id'\]\)"),
    (42, "expected a guanaco string"),
]


@pytest.mark.parametrize("row,match", MALFORMED)
def test_malformed_rows(tokenizer, row, match):
    with pytest.raises(MalformedRow, match=match):
        encode_chat(row, tokenizer)
    with pytest.raises(MalformedRow, match="malformed row 1: " + match) as err:
        encode_rows([GOOD, row, GOOD], tokenizer)
    assert repr(row)[:40] in str(err.value)  # the message shows the row
    assert "TrainConfig(skip_malformed=True)" in str(err.value) and "train_guanaco.py" in str(err.value)
    examples, stats = encode_rows([GOOD, row, GOOD], tokenizer, skip_malformed=True)
    assert len(examples) == 2 and stats.rows == 3 and sum(stats.skipped.values()) == 1
    assert list(stats.skipped)[0] == err.value.reason and stats.malformed == [(1, err.value.reason)]


# ---------------------------------------------------------------- loading

ROWS = [GOOD, 'hello, "world"\n[INST] x [/INST] y', "Привет 😀", "a;b\tc"]


def test_load_rows_from_every_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "text": t} for i, t in enumerate(ROWS)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["id", "text"])
        w.writeheader()
        w.writerows(records)
    for ext in ("jsonl", "json", "parquet", "csv"):
        assert load_rows(str(tmp_path / f"d.{ext}")) == ROWS, ext

    convs = [messages(p) for p in CONVERSATIONS.values()]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs), encoding="utf-8")
    assert load_rows(str(tmp_path / "m.jsonl")) == convs
    (tmp_path / "p.jsonl").write_text(json.dumps({"q": GOOD, "chat": convs[0]}) + "\n", encoding="utf-8")
    assert load_rows(str(tmp_path / "p.jsonl"), text_field="q") == [GOOD]
    assert load_rows(str(tmp_path / "p.jsonl"), messages_field="chat") == [convs[0]]


def test_load_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*owner/name"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "f.jsonl").write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"neither 'text' nor 'messages'; its fields are \['prompt', 'answer'\]"):
        load_rows(str(tmp_path / "f.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no rows"):
        load_rows(str(tmp_path / "e.jsonl"))
    (tmp_path / "e.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="has no rows"):
        load_rows(str(tmp_path / "e.json"))

    # invalid JSON: the file and its real line, blank lines counted
    lines = [json.dumps({"text": GOOD})] * 4 + ["", json.dumps({"text": GOOD}), "", '{"text": "<s>[INST] q'] + [""]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl', line 8 column \d+: invalid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text": "b"\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.json', line 4 column 1: invalid JSON"):
        load_rows(str(tmp_path / "bad.json"))


def jsonl(path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("where", [0, 2, 4])  # first, in the middle, last
def test_a_row_without_text_or_messages_is_malformed_wherever_it_is(tmp_path, tokenizer, where):
    texts = instruction_rows(4, seed=where)
    records = [{"text": t} for t in texts]
    records.insert(where, {"prompt": "q", "answer": "a"})
    rows = load_rows(jsonl(tmp_path / "rows.jsonl", records))
    reason = "a row with neither 'text' nor 'messages'"
    fields = r"\(its fields are \['prompt', 'answer'\]\)"
    with pytest.raises(MalformedRow, match=rf"^malformed row {where}: {reason} {fields}"):
        encode_rows(rows, tokenizer)
    examples, stats = encode_rows(rows, tokenizer, skip_malformed=True)
    assert stats.malformed == [(where, reason)] and stats.skipped == {reason: 1} and stats.rows == 5
    assert examples == encode_rows(texts, tokenizer)[0]  # the other rows, in their order


def test_rows_mix_text_and_messages_in_every_source(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = instruction_rows(6, seed=8)
    convs = [parse_text(t) for t in texts]
    # text rows, message rows, and rows where one field is null, as a table with both columns gives them
    records = [{"text": texts[0]}, {"messages": convs[1]}, {"text": None, "messages": convs[2]},
               {"text": texts[3], "messages": None}, {"messages": convs[4]}, {"text": texts[5]}]
    expected = [texts[0], convs[1], convs[2], texts[3], convs[4], texts[5]]
    pq.write_table(pa.table({k: [r.get(k) for r in records] for k in ("text", "messages")}), tmp_path / "rows.parquet")
    (tmp_path / "dir").mkdir()
    jsonl(tmp_path / "dir" / "rows.jsonl", records)
    sources = [jsonl(tmp_path / "rows.jsonl", records), str(tmp_path / "rows.parquet"), str(tmp_path / "dir")]
    for source in sources:  # the directory loads through datasets.load_dataset
        rows = load_rows(source)
        assert rows == expected, source
        examples, stats = encode_rows(rows, tokenizer)
        assert examples == encode_rows(texts, tokenizer)[0] and not stats.skipped


@pytest.mark.parametrize("indent", [None, 2])  # one line; pretty-printed over several
def test_a_json_array_saved_as_jsonl_is_named(tmp_path, indent):
    records = [{"text": t} for t in instruction_rows(3, seed=indent or 1)]
    (tmp_path / "rows.jsonl").write_text(json.dumps(records, indent=indent), encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl' holds one JSON array, not one JSON object per line; rename "
                                         r"it to \.json, or write one object per line$"):
        load_rows(str(tmp_path / "rows.jsonl"))
    (tmp_path / "rows.json").write_text(json.dumps(records, indent=indent), encoding="utf-8")
    assert load_rows(str(tmp_path / "rows.json")) == [r["text"] for r in records]  # what the message says works


@pytest.mark.parametrize("files", [{}, {"README.md": "# notes", "weights.bin": "\x00\x01"}])
def test_a_directory_without_data_files_is_refused(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=r"is a directory with no data files that can be read; pass a "
                                         r"\.jsonl/\.json/\.parquet/\.csv file, or a directory of such files") as err:
        load_rows(str(tmp_path) + "/")
    assert not isinstance(err.value, OSError)  # the example adds its offline hint to an OSError


def _csv(records: list[dict]) -> str:
    out = io.StringIO(newline="")
    w = csv.DictWriter(out, list(records[0]))  # lines end in \r\n, as the csv module writes them
    w.writeheader()
    w.writerows(records)
    return out.getvalue()


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_load_rows_skips_a_byte_order_mark(tmp_path, ext):
    # Notepad and Excel ("CSV UTF-8") open their UTF-8 files with the bytes EF BB BF
    records = [{"text": t, "id": i} for i, t in enumerate(ROWS)]  # the mark would stick to the first field's name
    text = {"jsonl": "".join(json.dumps(r) + "\n" for r in records), "json": json.dumps(records),
            "csv": _csv(records)}[ext]
    (tmp_path / f"bom.{ext}").write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    assert load_rows(str(tmp_path / f"bom.{ext}")) == ROWS


def test_load_rows_names_the_line_that_is_not_utf8(tmp_path):
    good = json.dumps({"text": GOOD}, ensure_ascii=False).encode("utf-8")
    bad = '{"text": "Привет '.encode("utf-8") + b'\xff"}'  # column 18: characters count, not bytes
    (tmp_path / "rows.jsonl").write_bytes(b"\n".join([good] * 4 + [b"", good, bad, good]) + b"\n")
    with pytest.raises(ValueError, match=r"^'[^']*rows\.jsonl', line 7: not UTF-8 \(byte 0xff at column 18\); "
                                         "save the file as UTF-8$"):
        load_rows(str(tmp_path / "rows.jsonl"))

    # Latin-1 "é" (0xe9) in files with \r\n line ends, one of them after a byte-order mark
    rows = [{"id": 0, "text": GOOD}, {"id": 1, "text": "café"}]
    for name, text in [("rows.json", json.dumps(rows, indent=1, ensure_ascii=False).replace("\n", "\r\n")),
                       ("rows.csv", _csv(rows))]:
        lines = text.encode("latin-1").split(b"\r\n")
        line = next(k for k, b in enumerate(lines, 1) if b"\xe9" in b)
        column = lines[line - 1].index(b"\xe9") + 1
        (tmp_path / name).write_bytes(codecs.BOM_UTF8 + text.encode("latin-1"))
        with pytest.raises(ValueError, match=rf"'[^']*{name}', line {line}: not UTF-8 \(byte 0xe9 at column "
                                             rf"{column}\); save the file as UTF-8"):
            load_rows(str(tmp_path / name))


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """An empty datasets cache, and a function that puts rows in it as the hub dataset minilora/NAME."""
    import shutil

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))

    def add(name, rows):  # the layout datasets leaves after a download: NS___NAME/CONFIG/VERSION/HASH/NAME-SPLIT.arrow
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        datasets.load_dataset("json", data_files=str(tmp_path / f"{name}.jsonl"), cache_dir=str(tmp_path / "build"))
        built = next((tmp_path / "build" / "json").glob("*/*/*/dataset_info.json")).parent
        target = tmp_path / "cache" / f"minilora___{name}" / "default" / "0.0.0" / "0"
        target.mkdir(parents=True)
        shutil.copy(built / "dataset_info.json", target)
        shutil.copy(built / "json-train.arrow", target / f"{name}-train.arrow")

    return add


def test_load_rows_from_the_hub_fails_fast_or_reads_the_cache(datasets_cache, monkeypatch):
    import time

    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError

    datasets_cache("rows", ROWS)
    start = time.perf_counter()
    assert load_rows("minilora/rows") == ROWS  # HF_HUB_OFFLINE=1 (conftest): from the cache
    with pytest.raises(FileNotFoundError, match=r"'nope_data' is not a file here and not a dataset on the hub "
                                                r"\(HF_HUB_OFFLINE=1, and the local cache does not hold it\)"):
        load_rows("nope_data")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online, but the hub does not answer
    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    assert load_rows("minilora/rows") == ROWS  # straight to the cache, no retries
    with pytest.raises(FileNotFoundError, match="not a dataset on the hub \\(the hub does not answer"):
        load_rows("nope_data")

    def not_there(*args, **kwargs):
        raise HFValidationError("Repo id must use alphanumeric chars")

    monkeypatch.setattr(HfApi, "dataset_info", not_there)
    with pytest.raises(FileNotFoundError, match="not a dataset on the hub \\(Repo id must use"):
        load_rows("nope data")
    assert time.perf_counter() - start < 20  # seconds, where datasets' own retries take 23 s for one name


def test_split_eval():
    rows = [f"row {i}" for i in range(40)]
    train, held = split_eval(rows, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == sorted(rows) and not set(train) & set(held)
    assert split_eval(rows, 0.1, seed=3) == (train, held) and split_eval(rows, 0.1, seed=4)[1] != held
    assert len(split_eval(rows, 7)[1]) == 7 and len(split_eval(rows, 1)[1]) == 1  # 1 is one row, not 100%
    assert len(split_eval(rows, 0.001)[1]) == 1  # a fraction holds out at least one row
    assert split_eval(rows, 0) == split_eval(rows, 0.0) == (rows, [])  # no held-out split at all
    for bad in (1.0, 2.5, -1, -0.5, "5", True):
        with pytest.raises(ValueError, match="fraction strictly between 0 and 1.*whole number of rows"):
            split_eval(rows, bad)
    with pytest.raises(ValueError, match="holds out 40 of 40 rows; leave at least one"):
        split_eval(rows, 40)
    assert check_eval_size(0.05) == 0.05


# ---------------------------------------------------------------- batching

def test_batches_deterministic_per_seed_and_epoch():
    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": [0] * n, "id": i}
                for i, n in enumerate(torch.randint(5, 500, (1000,), generator=gen).tolist())]
    ids = lambda bs: [[ex["id"] for ex in b] for b in bs]  # noqa: E731
    for group in (False, True):
        epoch0 = ids(batches(examples, 8, seed=1, group_by_length=group))
        assert epoch0 == ids(batches(examples, 8, seed=1, group_by_length=group))
        assert epoch0 != ids(batches(examples, 8, seed=1, group_by_length=group, epoch=1))
        assert epoch0 != ids(batches(examples, 8, seed=2, group_by_length=group))
        assert sorted(i for b in epoch0 for i in b) == list(range(1000))
        assert [len(b) for b in epoch0] == [8] * 125

    def spread(bs):  # mean max-min length within a batch
        bs = list(bs)
        return sum(max(len(e["input_ids"]) for e in b) - min(len(e["input_ids"]) for e in b) for b in bs) / len(bs)

    plain, grouped = spread(batches(examples, 8, seed=1)), spread(batches(examples, 8, seed=1, group_by_length=True))
    assert grouped < plain / 5, (grouped, plain)
    longest = [max(len(e["input_ids"]) for e in b) for b in batches(examples, 8, seed=1, group_by_length=True)]
    assert longest[:50] != sorted(longest[:50], reverse=True)  # the batch order is shuffled after sorting


# ---------------------------------------------------------------- CLI

def test_inspect_cli(tmp_path, tok_dir, capsys, monkeypatch):
    rows = [{"text": render_chat(messages(p, SYSTEM))} for p in CONVERSATIONS.values()]
    rows += [{"text": render_chat(messages([(LONG_Q, "Paris.")]))}, {"text": "not a chat row"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["inspect", str(path), "--tokenizer", tok_dir, "--max-len", "64", "--n", "2", "--skip-malformed"]
    monkeypatch.setattr(sys, "argv", ["minilora", *argv])
    runpy.run_module("minilora", run_name="__main__")  # python -m minilora inspect ...
    out = capsys.readouterr().out
    assert out.count("--- example") == 2 and "«Paris.</s>»" in out
    assert "rows: 5\n" in out and "turns: " in out and "truncated rows: " in out
    assert "skipped rows: 1\n" in out and "1  no [/INST]" in out
    assert "token lengths:" in out and "#" in out

    # rows under other field names, one of them with neither: the flags name the fields, the row is counted
    records = [{"q": t} for t in instruction_rows(3, seed=4)] + [{"chat": messages([("Hi", "Hello")])}, {"id": 5}]
    argv = ["inspect", jsonl(tmp_path / "named.jsonl", records), "--tokenizer", tok_dir, "--skip-malformed",
            "--text-field", "q", "--messages-field", "chat"]
    monkeypatch.setattr(sys, "argv", ["minilora", *argv])
    runpy.run_module("minilora", run_name="__main__")
    out = capsys.readouterr().out
    assert "rows: 5\n" in out and "skipped rows: 1\n" in out and "malformed rows: 4\n" in out
