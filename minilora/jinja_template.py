"""template="auto": the tokenizer's own Jinja chat template as a Template.

Where that template renders exactly what a built-in renders (probe conversations with and without a system prompt,
one and two turns, open questions), and the built-in's ids are the render's tokenized whole, auto is that built-in,
so auto over an official template equals the built-in. (A sentencepiece tokenizer given ChatML's tokens is one whose
ids differ: it reads each piece of text with a dummy "▁" prefix.) Llama 2's ids are taken as they have always been,
without the lone "▁" that the whole render has before each </s>. Without a chat_template auto is llama2.

Any other template is read by rendering each prefix of a conversation (DESIGN.md, "A chat template is a value"):
what the render of an assistant message adds to the render that ends with the generation prompt is that answer,
and the end-of-turn marker right after it (an added token such as <|im_end|>) is supervised with it; what follows
the marker is not. The whole render is then tokenized once, and a fast tokenizer's offsets map the supervised
characters to tokens.

A template whose renders are not prefixes of each other (it rewrites earlier turns when one is added) is refused:
no token of it can be told to be an answer's.

A template may write today's date from the clock, transformers' `strftime_now(format)`: Llama 3.1 to 3.3 write
"Today Date: 07 Dec 2026", Mistral Small 3 its own. `dated(day)` renders another day: the template is rendered with
a `strftime_now` of its own defined before it, which writes that day in each format the template names. So the
same rows encode to the same ids tomorrow, and a run resumed on a later day encodes its examples with the day it
began (DataStats.day).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import re
import weakref

from .chat_templates import BUILTINS, LLAMA2, Segment, Template, tokenizer_name
from .conversation import MalformedRow, Pairs, turns_of

INSTEAD = "pass template='llama2', 'llama3' or 'chatml' instead"

# Probes: without and with a system prompt, one and two turns, and open questions that prompt generation.
_QA = [("Hi there! Who are you?", "I am an assistant."), ("What is 2 + 2?", "It is 4.")]
PROBES = [(system, pairs) for system in (None, "Answer briefly.")
          for pairs in (_QA, _QA[:1], _QA[:1] + [("And 3 + 3?", None)], [("Hello.", None)])]

_CLOCK = re.compile(r"strftime_now\s*\(")  # a call of the clock
_CLOCK_FORMAT = re.compile(r"""strftime_now\s*\(\s*("[^"]*"|'[^']*')\s*\)""")  # a call with a literal format
# defined before a dated template, it shadows transformers' clock: each format's text comes in `minilora_day`
_DATED_CLOCK = "{% macro strftime_now(format) %}{{ minilora_day[format] }}{% endmacro %}"

_auto: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its chat_template, Template)


def auto_template(tok) -> Template:
    """template="auto" for tok: the built-in that its chat_template renders like, else that template itself; llama2
    for a tokenizer without one. Remembered per tokenizer until its chat_template changes."""
    source = getattr(tok, "chat_template", None)
    source = source.get("default") if isinstance(source, dict) else source
    if not source:
        return LLAMA2
    known = _auto.get(tok)
    if known is None or known[0] != source:
        jinja = JinjaTemplate(tok, source)
        known = (source, _builtin_like(jinja, tok) or jinja.probed())
        _auto[tok] = known
    return known[1]


def _builtin_like(jinja: JinjaTemplate, tok) -> Template | None:
    """The built-in that renders the probes as `jinja` does and, llama2 aside, gives the ids of its renders
    tokenized whole; None if there is none."""
    renders = [_renders(jinja, system, pairs) for system, pairs in PROBES]
    same = next((t for t in BUILTINS.values() if renders == [t.render(s, p) for s, p in PROBES]), None)
    if same is None or same is LLAMA2 or not getattr(tok, "is_fast", False):  # no offsets: the render is enough
        return same
    return same if all(same.segments(tok, s, p) == jinja.segments(tok, s, p) for s, p in PROBES) else None


def _renders(jinja: JinjaTemplate, system, pairs) -> str | None:
    try:
        return jinja.render(system, pairs)
    except MalformedRow:  # a template that cannot render a probe (a system prompt, say) renders it as no other
        return None


class JinjaTemplate(Template):
    """A tokenizer's Jinja chat template (its `chat_template`, or `source`), read by rendering prefixes."""

    def __init__(self, tokenizer, source: str | None = None):
        self.tokenizer, self.source = tokenizer, source or tokenizer.chat_template
        self.name = "jinja:" + hashlib.sha256(self.source.encode()).hexdigest()[:12]
        # an end-of-turn marker is an added token; whitespace ones (Gemma's "\n") are written as text
        self.added = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()),
                            key=len, reverse=True)  # longest first: the first match is the longest
        self.markers: list[str] | None = None  # the end-of-turn markers found after the probes' answers
        formats = [f[1:-1] for f in _CLOCK_FORMAT.findall(self.source)]
        # the formats in which it reads the clock; None if it computes one (then it cannot be given a day)
        self.clock_formats = formats if len(formats) == len(_CLOCK.findall(self.source)) else None

    def dated(self, day: str | None) -> JinjaTemplate:
        """A copy rendering `day` (ISO, "2026-12-07") as today; itself for None, and for a template that does not
        read the clock, or reads it in a format that it computes."""
        if day is None or day == self.day or not self.clock_formats:
            return self
        try:
            datetime.date.fromisoformat(day)
        except (TypeError, ValueError):
            raise ValueError(f"dated({day!r}): pass the day as 'YYYY-MM-DD', e.g. '2026-12-07'") from None
        dated = copy.copy(self)
        dated.day = day
        return dated

    def probed(self) -> JinjaTemplate:
        """Self, with the end-of-turn markers of the probe conversations found; refuses a template that rewrites
        earlier turns, or that does not write an answer as it is, and a tokenizer without offsets."""
        if self.markers is not None:
            return self
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"template 'auto' reads the chat template of the tokenizer "
                             f"{tokenizer_name(self.tokenizer)} through token offsets, which need a fast tokenizer; "
                             f"load it with use_fast=True, or {INSTEAD}")
        layouts = []
        for system, pairs in PROBES:
            try:
                layouts.append(self._layout(system, pairs))
            except MalformedRow:  # e.g. a template that refuses system prompts: rows with one will be refused
                pass
        if not layouts:
            raise ValueError(f"template 'auto': the chat template of the tokenizer {tokenizer_name(self.tokenizer)} "
                             f"renders none of the probe conversations (user and assistant turns); {INSTEAD}")
        self.markers = list(dict.fromkeys(m for _, _, spans in layouts for _, _, m in spans if m))
        return self

    def render(self, system: str | None, pairs: Pairs) -> str:
        return self._render(turns_of(system, pairs), generation=pairs[-1][1] is None)

    def _render(self, messages: list[dict], generation: bool) -> str:
        from jinja2 import TemplateError

        source, clock = self.source, {}
        if self.day:  # its clock is the template's own strftime_now, which writes self.day
            day = datetime.date.fromisoformat(self.day)
            source, clock = _DATED_CLOCK + source, {"minilora_day": {f: day.strftime(f) for f in self.clock_formats}}
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                      add_generation_prompt=generation, **clock)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:  # raise_exception(...), say
            raise MalformedRow(f"the tokenizer's chat template refuses it ({str(e).splitlines()[0]})",
                               messages) from None

    def _layout(self, system: str | None, pairs: Pairs) -> tuple[str, list[int], list[tuple]]:
        """(render, where each turn starts, each answer's supervised (start, end, marker)), in characters."""
        messages = turns_of(system, pairs)
        text = self._render(messages, generation=pairs[-1][1] is None)
        starts, spans, before = [], [], ""
        for k, (_, answer) in enumerate(pairs):
            starts.append(len(before))
            if answer is None:
                break
            n = (1 if system else 0) + 2 * k + 1  # messages up to this turn's question
            head, full = self._render(messages[:n], generation=True), self._render(messages[:n + 1], False)
            for shorter, longer, m in ((before, head, n - 1), (head, full, n), (full, text, n + 1)):
                if not longer.startswith(shorter):
                    raise ValueError(
                        f"template 'auto': the chat template of the tokenizer {tokenizer_name(self.tokenizer)} "
                        f"rewrites earlier turns when a turn is added (its render of the first {m} messages does not "
                        f"begin its render of more), so no token can be told to be an answer's; {INSTEAD}")
            spans.append(self._answer_span(full, len(head), answer))
            before = full
        return text, starts, spans

    def _answer_span(self, full: str, start: int, answer: str) -> tuple[int, int, str | None]:
        """(start, end, marker) of the supervised characters: the answer as it is, right after the generation
        prompt (whitespace aside), and the added token that follows it, if one does (whitespace aside)."""
        added = full[start:]
        lead = len(added) - len(added.lstrip())
        if not added.startswith(answer, lead):
            raise ValueError(f"template 'auto': the chat template of the tokenizer {tokenizer_name(self.tokenizer)} "
                             f"does not write an answer as it is after its generation prompt (it writes "
                             f"{added[:60]!r} for {answer[:30]!r}); {INSTEAD}")
        end = start + lead + len(answer)
        gap = len(full) - end - len(full[end:].lstrip())
        marker = next((m for m in self.added if full.startswith(m, end + gap)), None)
        return start + lead, end + gap + len(marker) if marker else end, marker

    def segments(self, tokenizer, system: str | None, pairs: Pairs) -> list[Segment]:
        self.probed()
        text, starts, spans = self._layout(system, pairs)
        ids, offsets = self._tokenize(tokenizer, text, turns_of(system, pairs), pairs[-1][1] is None)
        ends = starts[1:] + [len(text) + 1]
        segs, t = [], 0
        for k in range(len(pairs)):
            s, e = spans[k][:2] if k < len(spans) else (len(text) + 1,) * 2  # an open question: all prompt
            prompt, answer, after = [], [], []
            while t < len(ids) and offsets[t][0] < ends[k]:  # the tokens that start in turn k
                a, b = offsets[t]
                if a < e and b > s:  # a token that holds a supervised character is supervised
                    answer.append(ids[t])
                else:
                    (prompt if b <= s else after).append(ids[t])
                t += 1
            segs.append((prompt, answer, after))
        return segs

    def _tokenize(self, tok, text: str, messages: list[dict], generation: bool) -> tuple[list[int], list[tuple]]:
        """The render's ids and character offsets, tokenized whole; a message that holds a special token's text
        is encoded as text there (split_special_tokens), so that a literal "<|im_end|>" in it stays text."""
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        risky = {j for j, m in enumerate(messages) if any(a in m["content"] for a in self.added)}
        for s, e in reversed(self._content_spans(text, messages, risky, generation) if risky else []):  # last first
            inside = [t for t, (a, b) in enumerate(offsets) if a < e and b > s]  # the tokens that touch it
            if not inside:
                continue
            i, j = inside[0], inside[-1] + 1
            a, b = min(s, offsets[i][0]), max(e, offsets[j - 1][1])
            sub = tok(text[a:b], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
            ids[i:j] = sub["input_ids"]
            offsets[i:j] = [(x + a, y + a) for x, y in sub["offset_mapping"]]
        return ids, offsets

    def _content_spans(self, text: str, messages: list[dict], which: set, generation: bool) -> list[tuple]:
        """Where the contents of messages[j], j in `which`, lie in text: found by rendering with placeholders."""
        marked = [{**m, "content": f"\ue000{j}\ue001"} if j in which else m for j, m in enumerate(messages)]
        parts = re.split("\ue000(\\d+)\ue001", self._render(marked, generation))  # [text, j, text, j, ..., text]
        rebuilt, spans = parts[0], []
        for j, after in zip(parts[1::2], parts[2::2]):
            content = messages[int(j)]["content"]
            spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content + after
        if rebuilt != text:
            raise ValueError(f"template 'auto': the chat template of the tokenizer {tokenizer_name(self.tokenizer)} "
                             f"changes a message that holds a special token's text; {INSTEAD}")
        return spans

    def stop_ids(self, tokenizer) -> list[int]:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return list(dict.fromkeys([tokenizer.convert_tokens_to_ids(m) for m in self.probed().markers] + eos))
