"""Conversations under a chat template: choosing the template, rendering, and tokenize-and-mask (ids and labels,
truncation), with DataStats and IGNORE, the label of an unsupervised position.

The template is a value (chat_templates.py): a built-in's name ("llama2", "llama3", "chatml"), "auto" (the
tokenizer's own Jinja template, jinja_template.py; llama2 without one), or a Template. Rows are parsed into turns by
conversation.py, whatever the template: guanaco's `<s>[INST] ...` text rows train a Llama 3 or a Qwen2 as well.
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .chat_templates import BUILTINS, LLAMA2, Template
from .conversation import MalformedRow, Pairs, Turn, conversation
from .jinja_template import auto_template

IGNORE = -100  # label of an unsupervised position (cross_entropy's ignore_index)


class SkipExample(ValueError):
    """A well-formed row that leaves no supervised token under max_len; encode_rows counts it by its message."""


def get_template(template: str | Template = "auto", tokenizer=None) -> Template:
    """The Template that a name stands for: "llama2", "llama3", "chatml", or "auto" (the tokenizer's own chat
    template; llama2 for a tokenizer without one, or without a tokenizer). A Template is returned as it is."""
    if isinstance(template, Template):
        return template
    if template == "auto":
        return LLAMA2 if tokenizer is None else auto_template(tokenizer)
    if template not in BUILTINS:
        raise ValueError(f"template={template!r}; pass 'auto' (the tokenizer's own chat template, else llama2), one "
                         f"of {list(BUILTINS)}, or a minilora Template")
    return BUILTINS[template]


def render_chat(turns_or_text: list[Turn] | str | dict, template: str | Template = "auto", tokenizer=None) -> str:
    """The conversation as one string, special tokens written out. Under llama2 (the default without a tokenizer)
    that is how guanaco rows are written; a last open question ends with the generation prompt."""
    return get_template(template, tokenizer).render(*conversation(turns_or_text))


# ---------------------------------------------------------------- token ids and labels

def encode_chat(turns_or_text: list[Turn] | str | dict, tokenizer, max_len: int = 1024,
                template: str | Template = "auto") -> dict:
    """Ids and labels of one conversation: {"input_ids", "labels", "truncated"} (lists of ints, and a bool).

    Each turn is its prompt (the template's markup, the question, the generation prompt), the answer with its
    end-of-turn marker, and what the template writes after that marker. The answers and their markers are
    supervised (label = id); everything else is -100. When the ids exceed max_len:
      1. the earliest whole turns are dropped while more than one remains (a system prompt moves along);
      2. the head of the remaining prompt is cut: its first id (BOS, or the template's first token) stays first,
         the tail ending in the generation prompt is kept;
      3. once the prompt is down to a quarter of max_len, the answer's tail is cut instead (and its marker).
    Raises MalformedRow for a bad row and SkipExample when no answer token fits.
    """
    return _encode_chat(turns_or_text, tokenizer, max_len, get_template(template, tokenizer))[0]


def _encode_chat(turns_or_text, tokenizer, max_len: int, template: Template) -> tuple[dict, Pairs]:
    """encode_chat's example, and the (question, answer) pairs that it kept."""
    system, pairs = conversation(turns_or_text)
    if pairs[-1][1] is None:
        raise MalformedRow("the last question has no answer (encode_prompt is for generation)", turns_or_text)
    segs = template.segments(tokenizer, system, pairs)
    total = sum(map(_length, segs))
    truncated = total > max_len
    while len(pairs) > 1 and total > max_len:
        pairs = pairs[1:]
        # a later turn encodes the same whatever precedes it; the first one carries the system prompt along
        segs = template.segments(tokenizer, system, pairs[:1]) + segs[2:]
        total = sum(map(_length, segs))
    if total > max_len:  # one turn left, too long
        segs = [_cut(*segs[0], max_len)]
    input_ids = [i for p, a, f in segs for i in p + a + f]
    labels = [i for p, a, f in segs for i in [IGNORE] * len(p) + a + [IGNORE] * len(f)]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}, pairs


def _length(segment: tuple) -> int:
    return sum(map(len, segment))


def _cut(prompt: list, answer: list, after: list, max_len: int) -> tuple[list, list, list]:
    """One turn cut to max_len: the prompt's head (its first id stays), then the answer's tail."""
    # A quarter of max_len stays with the question: an answer cut loose from its question teaches nothing.
    floor = min(len(prompt), max(1, max_len // 4))
    n_prompt = max(floor, max_len - len(answer) - len(after))
    room = max_len - n_prompt
    if room <= 0 or not answer:
        raise SkipExample(f"max_len={max_len} leaves no room for an answer")
    return prompt[:1] + prompt[len(prompt) - n_prompt + 1:], answer[:room], after[:max(0, room - len(answer))]


def encode_prompt(turns_or_text: list[Turn] | str | dict, tokenizer, template: str | Template = "auto") -> list[int]:
    """Ids that prompt generation: the conversation so far, ending with the template's generation prompt (llama2's
    "[/INST]", Llama 3's and ChatML's assistant header)."""
    system, pairs = conversation(turns_or_text)
    if pairs[-1][1] is not None:
        raise MalformedRow("the last turn is an answer; end with a user message to prompt", turns_or_text)
    return [i for p, a, f in get_template(template, tokenizer).segments(tokenizer, system, pairs) for i in p + a + f]


def stop_ids(tokenizer, template: str | Template = "auto") -> list[int]:
    """The ids that end a generated answer under the template: its end-of-turn markers, then EOS."""
    return get_template(template, tokenizer).stop_ids(tokenizer)


@dataclass
class DataStats:
    """What encode_rows kept, and why it dropped the rest."""
    rows: int = 0  # rows read
    turns: int = 0  # question/answer turns in the kept examples, after truncation
    tokens: int = 0  # ids in the kept examples
    supervised: int = 0  # ids with a label
    truncated: int = 0  # kept examples that lost turns or tokens to max_len
    empty_questions: int = 0  # kept turns with an empty question, "[INST]  [/INST] answer": trained on as written
    empty_answers: int = 0  # kept turns with an empty answer, "[INST] q [/INST]  </s>": only their marker is supervised
    skipped: Counter = field(default_factory=Counter)  # reason -> number of rows
    malformed: list = field(default_factory=list)  # (index, reason) of each malformed row skipped
    template: str = ""  # the name of the chat template that encoded the examples
    day: str = ""  # the day it wrote as today ("2026-12-07"), for a template that writes the date

    def summary(self, max_len: int) -> str:
        """One line: what was kept, truncated, empty and skipped, and the template."""
        return (f"{self.rows - sum(self.skipped.values())} examples from {self.rows} rows, {self.supervised} "
                f"supervised tokens; {self.truncated} truncated to {max_len} tokens; empty questions: "
                f"{self.empty_questions}, empty answers: {self.empty_answers}; skipped: {dict(self.skipped) or 'none'}"
                f"; template: {self.template or 'unknown'}{f', dated {self.day}' if self.day else ''}")

    def record(self) -> dict:
        """The counts as the first line of metrics.jsonl holds them."""
        return {"train_rows": self.rows, "examples": self.rows - sum(self.skipped.values()),
                "skipped_rows": dict(self.skipped), "truncated_rows": self.truncated,
                "supervised_tokens": self.supervised, "empty_questions": self.empty_questions,
                "empty_answers": self.empty_answers, "template": self.template,
                **({"day": self.day} if self.day else {})}


def encode_rows(rows: Iterable, tokenizer, max_len: int = 1024, skip_malformed: bool = False,
                template: str | Template = "auto") -> tuple[list[dict], DataStats]:
    """encode_chat over rows (guanaco strings, {"text"} or {"messages"} dicts; a list or a datasets.Dataset).

    A malformed row raises, or with skip_malformed=True is skipped and counted (with its index in
    stats.malformed); a row with no room for an answer is always skipped and counted. train() takes the
    returned (examples, stats) as they are, so data checked before the model loads is not encoded again.
    A template that writes the date writes the template's day, else today's, the same in every row (stats.day).
    """
    template = get_template(template, tokenizer)
    template = template.dated(template.day or today())  # a dated template keeps its day
    examples, stats = [], DataStats(template=template.name, day=template.day or "")
    for i, row in enumerate(rows):
        stats.rows += 1
        try:
            ex, pairs = _encode_chat(row, tokenizer, max_len, template)
        except MalformedRow as e:
            e.index = i
            if not skip_malformed:
                raise
            stats.skipped[e.reason] += 1
            stats.malformed.append((i, e.reason))
        except SkipExample as e:
            stats.skipped[str(e)] += 1
        else:
            _count(stats, ex, pairs)
            examples.append(ex)
    if not examples:
        raise ValueError(f"no example left out of {stats.rows} rows (skipped: {dict(stats.skipped)}); "
                         "check the rows' format, or raise max_len")
    return examples, stats


def today() -> str:
    """Today's date, as a template's day is written: "2026-12-07"."""
    return datetime.date.today().isoformat()


def _count(stats: DataStats, ex: dict, pairs: Pairs):
    stats.turns += len(pairs)
    stats.empty_questions += sum(not q for q, _ in pairs)
    stats.empty_answers += sum(not a for _, a in pairs)
    stats.tokens += len(ex["input_ids"])
    stats.supervised += sum(label != IGNORE for label in ex["labels"])
    stats.truncated += ex["truncated"]
