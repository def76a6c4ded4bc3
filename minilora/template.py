"""The LLaMA-2 chat template: the [INST] markers, parsing guanaco rows and message lists, rendering, and
tokenize-and-mask (ids and labels, truncation), with DataStats and IGNORE, the label of an unsupervised position.

Ids are built segment by segment (BOS id, prompt, answer, EOS id), never by tokenizing a rendered string:
sentencepiece pieces depend on what precedes them, the literal text "<s>" is not BOS, and HF turns a literal
"</s>" inside user text into a real EOS id unless told not to.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

IGNORE = -100  # label of an unsupervised position (cross_entropy's ignore_index)
BOS, EOS, B_INST, E_INST = "<s>", "</s>", "[INST]", "[/INST]"  # literal markers, as written in guanaco rows
B_SYS, E_SYS = "<<SYS>>", "<</SYS>>"
ROW_FORM = ("rows look like '<s>[INST] question [/INST] answer </s>' "
            "or [{'role': 'user', 'content': ...}, {'role': 'assistant', 'content': ...}]")

Turn = dict  # {"role": "system" | "user" | "assistant", "content": str}
Pairs = list  # [(question, answer or None), ...]: None only for a last question that prompts generation


class MalformedRow(ValueError):
    """A row that is not a well-formed conversation. `reason` is short, to be counted; `detail` follows it in the
    message; `index` is set by encode_rows."""

    def __init__(self, reason: str, row: Any, detail: str = ""):
        super().__init__(reason)
        self.reason, self.row, self.index, self.detail = reason, row, None, detail

    def __str__(self) -> str:
        excerpt = repr(self.row)
        excerpt = excerpt if len(excerpt) <= 100 else excerpt[:70] + " ... " + excerpt[-25:]
        where = "" if self.index is None else f" {self.index}"
        hint = "" if self.index is None else (
            "; TrainConfig(skip_malformed=True) or encode_rows(..., skip_malformed=True) skips and counts such "
            "rows, as examples/train_guanaco.py does unless --strict")
        return f"malformed row{where}: {self.reason}{self.detail}: {excerpt}; {ROW_FORM}{hint}"


class SkipExample(ValueError):
    """A well-formed row that leaves no supervised token under max_len; encode_rows counts it by its message."""


# ---------------------------------------------------------------- template and parsing

def _prompt(question: str, system: str | None = None) -> str:
    """One turn's prompt, "[INST] ... [/INST]", with the template's spaces (the system block in turn 0 only)."""
    sys_block = f"{B_SYS}\n{system}\n{E_SYS}\n\n" if system else ""
    return f"{B_INST} {sys_block}{question} {E_INST}"


def render_chat(turns: list[Turn] | str | dict) -> str:
    """The conversation as one string with literal markers, the way guanaco rows are written."""
    system, pairs = _conversation(turns)
    return "".join(f"{BOS}{_prompt(q, system if k == 0 else None)}" + (f" {a} {EOS}" if a is not None else "")
                   for k, (q, a) in enumerate(pairs))


_MARKERS = re.compile(r"(<s>|</s>|\[INST\]|\[/INST\])")


def parse_text(text: str) -> list[Turn]:
    """Parse a guanaco row, `<s>[INST] q [/INST] a </s><s>[INST] ...`, into turns.

    A turn's `<s>` may be missing and whitespace around markers is free. The first question may open with a
    `<<SYS>>\\n...\\n<</SYS>>` block. A question or an answer may be empty (`[INST]  [/INST] a </s>`,
    `[INST] q [/INST]  </s>`), as a few guanaco rows have. A last `[INST] q [/INST]` without answer or `</s>`
    is a prompt: it parses, with no assistant turn, and encode_chat refuses it.
    """
    parts = _MARKERS.split(text)  # [text, marker, text, marker, ..., text]
    if E_INST not in parts[1::2]:
        raise MalformedRow("no [/INST]", text)
    if parts[0].strip():
        raise MalformedRow("text before the first [INST]", text)
    seq = deque(zip(parts[1::2], parts[2::2]))  # (marker, the text after it), consumed from the left
    turns = []

    def take(marker: str, what: str) -> str:
        """The text after the next marker, which must be `marker`."""
        got = seq[0][0] if seq else "the end of the text"
        if got != marker:
            raise MalformedRow(f"unbalanced markers: expected {marker} {what}, found {got}", text)
        return seq.popleft()[1]

    while seq:
        if seq[0][0] == BOS and seq.popleft()[1].strip():  # a turn's optional <s>
            raise MalformedRow("text between <s> and [INST]", text)
        question = take(B_INST, "to open a turn").strip()
        answer = take(E_INST, "after the question").strip()
        if not seq and not answer:  # an open last question: a prompt for generation
            turns.append({"role": "user", "content": question})
            break
        if take(EOS, "after the answer").strip():
            raise MalformedRow("text between </s> and the next turn" if seq else "text after the last </s>", text)
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    # The turns alternate user/assistant by construction: _pairs would find nothing to refuse.
    first = turns[0]["content"]
    if first.startswith(B_SYS):
        system, sep, rest = first[len(B_SYS):].partition(E_SYS)
        if not sep:
            raise MalformedRow("<<SYS>> without <</SYS>>", text)
        turns[0]["content"] = rest.strip()
        turns.insert(0, {"role": "system", "content": system.strip()})
    return turns


def _pairs(messages: Any, row: Any) -> tuple[str | None, Pairs]:
    """Check the roles and contents of a message list; return (system, [(question, answer), ...]), stripped.
    Empty contents are legal: an empty question is encoded as the template writes it, an empty answer is EOS."""
    if not isinstance(messages, (list, tuple)):
        raise MalformedRow("expected a guanaco string, a list of messages, or a dict with 'text' or 'messages'", row)
    system, pairs = None, []
    for j, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise MalformedRow(f"message {j} is not a {{'role': 'system'|'user'|'assistant', 'content': str}}", row)
        content = content.strip()  # as the template does: one space separates content from the markers
        expected = "assistant" if pairs and pairs[-1][1] is None else "user"
        if role == "system" and j == 0:
            system = content or None
        elif role != expected:
            raise MalformedRow(f"roles out of order: message {j} is {role!r}, expected {expected!r}", row)
        elif role == "user":
            pairs.append((content, None))
        else:
            pairs[-1] = (pairs[-1][0], content)
    if not pairs:
        raise MalformedRow("no user message", row)
    return system, pairs


def row_field(record: dict, text_field: str = "text", messages_field: str = "messages") -> str | None:
    """The field that holds a record's conversation: text_field when it has a value, else messages_field, else
    None. A None value counts as missing: a datasets row gives None for a column that it lacks."""
    return next((name for name in (text_field, messages_field) if record.get(name) is not None), None)


def _conversation(row: Any) -> tuple[str | None, Pairs]:
    """(system, pairs) from any row form: guanaco text, a message list, or a dict with "text"/"messages"."""
    if isinstance(row, dict):
        name = row_field(row)
        if name is None:
            fields = [k for k, v in row.items() if v is not None]
            raise MalformedRow("a row with neither 'text' nor 'messages'", row, f" (its fields are {fields})")
        row = row[name]
    return _pairs(parse_text(row) if isinstance(row, str) else row, row)


# ---------------------------------------------------------------- token ids and labels

def _encode(tok, text: str) -> list[int]:
    # split_special_tokens: a literal "</s>" in user text stays text; without it, it would become EOS id 2
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def _segments(tok, system: str | None, pairs: Pairs) -> list[tuple[list[int], list[int]]]:
    """Each turn's ids: (BOS + prompt, answer + EOS), the system block in the first turn. An answer is encoded
    on its own; sentencepiece's dummy "▁" prefix stands for the space after [/INST]. No answer: no ids."""
    return [([tok.bos_token_id] + _encode(tok, _prompt(q, system if k == 0 else None)),
             [] if a is None else _encode(tok, a) + [tok.eos_token_id]) for k, (q, a) in enumerate(pairs)]


def encode_chat(turns_or_text: list[Turn] | str | dict, tokenizer, max_len: int = 1024) -> dict:
    """Ids and labels of one conversation: {"input_ids", "labels", "truncated"} (lists of ints, and a bool).

    Every turn is BOS, "[INST] ... [/INST]", the answer, EOS. The answers and their EOS are supervised
    (label = id); everything else is -100. When the ids exceed max_len:
      1. the earliest whole turns are dropped while more than one remains (a system prompt moves along);
      2. the head of the remaining prompt is cut: BOS stays first, the tail ending in [/INST] is kept;
      3. once the prompt is down to a quarter of max_len, the answer's tail is cut instead (and its EOS).
    Raises MalformedRow for a bad row and SkipExample when no answer token fits.
    """
    return _encode_chat(turns_or_text, tokenizer, max_len)[0]


def _encode_chat(turns_or_text, tokenizer, max_len: int) -> tuple[dict, Pairs]:
    """encode_chat's example, and the (question, answer) pairs that it kept."""
    system, pairs = _conversation(turns_or_text)
    if pairs[-1][1] is None:
        raise MalformedRow("the last question has no answer (encode_prompt is for generation)", turns_or_text)
    segs = _segments(tokenizer, system, pairs)
    total = sum(len(p) + len(a) for p, a in segs)
    truncated = total > max_len
    while len(pairs) > 1 and total > max_len:
        pairs = pairs[1:]
        segs = _segments(tokenizer, system, pairs[:1]) + segs[2:]  # the system block moves along
        total = sum(len(p) + len(a) for p, a in segs)
    if total > max_len:  # one turn left, too long
        prompt, answer = segs[0]
        # A quarter of max_len stays with the question: an answer cut loose from its question teaches nothing.
        floor = min(len(prompt), max(1, max_len // 4))
        n_prompt = max(floor, max_len - len(answer))
        segs = [(prompt[:1] + prompt[len(prompt) - n_prompt + 1:], answer[:max(0, max_len - n_prompt)])]
        if not segs[0][1]:
            raise SkipExample(f"max_len={max_len} leaves no room for an answer")
    input_ids = [i for p, a in segs for i in p + a]
    labels = [i for p, a in segs for i in [IGNORE] * len(p) + a]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}, pairs


def encode_prompt(turns_or_text: list[Turn] | str | dict, tokenizer) -> list[int]:
    """Ids that prompt generation: the conversation so far, ending with the last question's [/INST] tokens."""
    system, pairs = _conversation(turns_or_text)
    if pairs[-1][1] is not None:
        raise MalformedRow("the last turn is an answer; end with a user message to prompt", turns_or_text)
    return [i for p, a in _segments(tokenizer, system, pairs) for i in p + a]


@dataclass
class DataStats:
    """What encode_rows kept, and why it dropped the rest."""
    rows: int = 0  # rows read
    turns: int = 0  # question/answer turns in the kept examples, after truncation
    tokens: int = 0  # ids in the kept examples
    supervised: int = 0  # ids with a label
    truncated: int = 0  # kept examples that lost turns or tokens to max_len
    empty_questions: int = 0  # kept turns with an empty question, "[INST]  [/INST] answer": trained on as written
    empty_answers: int = 0  # kept turns with an empty answer, "[INST] q [/INST]  </s>": only their EOS is supervised
    skipped: Counter = field(default_factory=Counter)  # reason -> number of rows
    malformed: list = field(default_factory=list)  # (index, reason) of each malformed row skipped

    def summary(self, max_len: int) -> str:
        """One line: what was kept, truncated, empty and skipped."""
        return (f"{self.rows - sum(self.skipped.values())} examples from {self.rows} rows, {self.supervised} "
                f"supervised tokens; {self.truncated} truncated to {max_len} tokens; empty questions: "
                f"{self.empty_questions}, empty answers: {self.empty_answers}; skipped: {dict(self.skipped) or 'none'}")

    def record(self) -> dict:
        """The counts as the first line of metrics.jsonl holds them."""
        return {"train_rows": self.rows, "examples": self.rows - sum(self.skipped.values()),
                "skipped_rows": dict(self.skipped), "truncated_rows": self.truncated,
                "supervised_tokens": self.supervised, "empty_questions": self.empty_questions,
                "empty_answers": self.empty_answers}


def encode_rows(rows: Iterable, tokenizer, max_len: int = 1024, skip_malformed: bool = False
                ) -> tuple[list[dict], DataStats]:
    """encode_chat over rows (guanaco strings, {"text"} or {"messages"} dicts; a list or a datasets.Dataset).

    A malformed row raises, or with skip_malformed=True is skipped and counted (with its index in
    stats.malformed); a row with no room for an answer is always skipped and counted. train() takes the
    returned (examples, stats) as they are, so data checked before the model loads is not encoded again.
    """
    examples, stats = [], DataStats()
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            ex, pairs = _encode_chat(row, tokenizer, max_len)
        except MalformedRow as e:
            e.index = i
            if not skip_malformed:
                raise
            stats.skipped[e.reason] += 1
            stats.malformed.append((i, e.reason))
        except SkipExample as e:
            stats.skipped[str(e)] += 1
        else:
            examples.append(ex)
            stats.turns += len(pairs)
            stats.empty_questions += sum(not q for q, _ in pairs)
            stats.empty_answers += sum(not a for _, a in pairs)
            stats.tokens += len(ex["input_ids"])
            stats.supervised += sum(label != IGNORE for label in ex["labels"])
            stats.truncated += ex["truncated"]
    if not examples:
        raise ValueError(f"no example left out of {stats.rows} rows (skipped: {dict(stats.skipped)}); "
                         "check the rows' format, or raise max_len")
    return examples, stats

