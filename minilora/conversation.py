"""Rows as conversations: guanaco text rows parsed into turns, message lists checked, and MalformedRow.

Whatever its form, a row becomes (system, pairs): the system prompt or None, and [(question, answer), ...], each
content stripped. A chat template (chat_templates.py) renders that pair list; nothing here knows a template but
guanaco's text form, `<s>[INST] q [/INST] a </s>`, which is how rows arrive.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

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
    Empty contents are legal: an empty question is encoded as the template writes it, an empty answer is its
    end-of-turn marker alone."""
    if not isinstance(messages, (list, tuple)):
        raise MalformedRow("expected a guanaco string, a list of messages, or a dict with 'text' or 'messages'", row)
    system, pairs = None, []
    for j, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise MalformedRow(f"message {j} is not a {{'role': 'system'|'user'|'assistant', 'content': str}}", row)
        content = content.strip()  # every template then writes content the same way, with its own spacing
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


def conversation(row: Any) -> tuple[str | None, Pairs]:
    """(system, pairs) from any row form: guanaco text, a message list, or a dict with "text"/"messages"."""
    if isinstance(row, dict):
        name = row_field(row)
        if name is None:
            fields = [k for k, v in row.items() if v is not None]
            raise MalformedRow("a row with neither 'text' nor 'messages'", row, f" (its fields are {fields})")
        row = row[name]
    return _pairs(parse_text(row) if isinstance(row, str) else row, row)


def turns_of(system: str | None, pairs: Pairs) -> list[Turn]:
    """The message list of (system, pairs): what a Jinja chat template takes. A last answer of None is left out."""
    turns = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        turns.append({"role": "user", "content": question})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
    return turns
