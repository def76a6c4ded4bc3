"""Chat templates as values: how a conversation renders, which of its tokens are supervised, and what stops
generation. The built-ins, llama2, llama3 and chatml, are written as pieces (text and special tokens); "auto", the
tokenizer's own Jinja template, is in jinja_template.py.

A template turns (system, pairs) into segments, one per turn: (prompt ids, answer ids, after ids). The answer is
supervised: the assistant's words and the end-of-turn marker right after them. The prompt and what follows the
marker (ChatML's "\\n") are not. A turn's prompt ends with the generation prompt ("[/INST]", the assistant's header),
so a last question without an answer is what prompts generation. Splitting by turn is what lets truncation drop
the earliest whole turns, whatever the template.

A built-in builds its ids piece by piece, never by tokenizing a rendered string (DESIGN.md, "Tokenizer traps"): a
special token goes in as its id, and text is encoded with split_special_tokens=True, so that a literal "</s>" or
"<|im_end|>" in a message stays text. Each piece of text ends where a byte-level BPE splits the render anyway (at a
special token, or between a "\\n" and the answer after it), so llama3's and chatml's ids equal the official render's
tokenized whole, token for token (tests/test_templates.py); llama2's lack only the lone "▁" that sentencepiece gives
the space before each </s>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .conversation import Pairs

Segment = tuple  # (prompt ids, answer ids, after ids) of one turn: only the answer is supervised


class Template:
    """A chat template: `name`, and how a conversation (system, pairs) renders, encodes and stops.

    pairs are [(question, answer), ...] with stripped contents (conversation.py); the last answer may be None, a
    question that prompts generation. Subclass it for a template that pieces cannot write (jinja_template.py)."""

    name: str
    day: str | None = None  # the day it renders as today ("2026-12-07"), for a template that writes the date

    def dated(self, day: str | None) -> Template:
        """This template rendering `day` (ISO, "2026-12-07") as today; None leaves it as it is. A built-in writes no
        date: it is itself."""
        return self

    def render(self, system: str | None, pairs: Pairs) -> str:
        """The conversation as text, special tokens written out; a last open question ends with the generation
        prompt."""
        raise NotImplementedError

    def segments(self, tokenizer, system: str | None, pairs: Pairs) -> list[Segment]:
        """One (prompt, answer, after) of ids per pair; an open question's answer and after are []. The system
        prompt goes in the first turn: drop turn 0 and ask again, and it moves along."""
        raise NotImplementedError

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids that end a generated answer: the end-of-turn markers, then the tokenizer's EOS."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<chat template {self.name!r}>"


@dataclass(frozen=True)
class Special:
    """A special token, put in as its id. role "bos"/"eos": the tokenizer's own BOS/EOS, spelled `text` in a render."""
    text: str
    role: str | None = None


@dataclass(frozen=True)
class Text:
    """Text, encoded on its own with split_special_tokens=True. `shown`: what a render writes, where it differs."""
    text: str
    shown: str | None = None


def tokenizer_name(tok) -> str:
    return repr(getattr(tok, "name_or_path", "") or type(tok).__name__)


def special_id(tok, special: Special, template: str) -> int:
    """The id of a special token in tok, or one error that names it, the tokenizer and what to do."""
    if special.role:
        i = getattr(tok, f"{special.role}_token_id", None)
        if i is None:
            raise ValueError(
                f"template {template!r} needs the tokenizer's {special.role.upper()} token, and the tokenizer "
                f"{tokenizer_name(tok)} has none{' (Qwen2 has no BOS)' if special.role == 'bos' else ''}; pass the "
                "template its model was trained with: template='chatml' for Qwen2, 'llama3' for Llama 3, or 'auto' "
                "for the tokenizer's own")
        return i
    i = tok.convert_tokens_to_ids(special.text)
    if i is None or (i == tok.unk_token_id and special.text != tok.unk_token):
        raise ValueError(
            f"template {template!r} needs the special token {special.text!r}, which the tokenizer "
            f"{tokenizer_name(tok)} lacks; pass the template its model was trained with ('auto' reads the "
            "tokenizer's own chat template), or add the token to the tokenizer and resize the model's embeddings")
    return i


@dataclass(frozen=True, repr=False)
class PieceTemplate(Template):
    """A template written as pieces. prompt(system, question, first) gives a turn's pieces up to its answer, the
    generation prompt included (system is None but in the first turn); answer(text) the supervised pieces;
    `after` the unsupervised pieces that follow an answer; `stops` the end-of-turn tokens besides EOS."""

    name: str
    prompt: Callable[[str | None, str, bool], list]
    answer: Callable[[str], list]
    after: tuple = ()
    stops: tuple = ()
    specials: tuple = field(init=False)  # every special token the template writes: checked before encoding

    def __post_init__(self):
        pieces = self.prompt("s", "q", True) + self.prompt(None, "q", False) + self.answer("a") + list(self.after)
        found = [p for p in pieces + list(self.stops) if isinstance(p, Special)]
        object.__setattr__(self, "specials", tuple(dict.fromkeys(found)))

    def render(self, system: str | None, pairs: Pairs) -> str:
        pieces = [p for k, (q, a) in enumerate(pairs) for p in self.prompt(system if k == 0 else None, q, k == 0)
                  + ([] if a is None else self.answer(a) + list(self.after))]
        return "".join(p.text if isinstance(p, Special) or p.shown is None else p.shown for p in pieces)

    def segments(self, tokenizer, system: str | None, pairs: Pairs) -> list[Segment]:
        ids = {s: special_id(tokenizer, s, self.name) for s in self.specials}

        def encode(pieces) -> list[int]:
            out = []
            for p in pieces:
                if isinstance(p, Special):
                    out.append(ids[p])
                elif p.text:  # split_special_tokens: a literal "</s>" in user text stays text, not EOS
                    out += tokenizer.encode(p.text, add_special_tokens=False, split_special_tokens=True)
            return out

        after = encode(self.after)
        return [(encode(self.prompt(system if k == 0 else None, q, k == 0)),
                 [] if a is None else encode(self.answer(a)), [] if a is None else after)
                for k, (q, a) in enumerate(pairs)]

    def stop_ids(self, tokenizer) -> list[int]:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return list(dict.fromkeys([special_id(tokenizer, s, self.name) for s in self.stops] + eos))


# ---------------------------------------------------------------- the built-ins

# Llama 2 chat (DESIGN.md, "The LLaMA-2 chat template"): every turn is `<s>[INST] q [/INST] a </s>`, the system
# block in the first question. The answer is encoded on its own: sentencepiece's dummy "▁" prefix stands for the
# space after [/INST], and the space before </s> gets no token (the official render tokenized whole has a lone "▁").
L2_BOS, L2_EOS = Special("<s>", "bos"), Special("</s>", "eos")


def _llama2_prompt(system: str | None, question: str, first: bool) -> list:
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    return [L2_BOS, Text(f"[INST] {sys_block}{question} [/INST]")]


LLAMA2 = PieceTemplate("llama2", _llama2_prompt, lambda a: [Text(a, shown=f" {a} "), L2_EOS])

# Llama 3 Instruct: <|begin_of_text|> once, then `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`
# per message; the generation prompt is the assistant's header and its "\n\n".
BEGIN, END, HEAD, END_HEAD, EOT = (Special(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                       "<|end_header_id|>", "<|eot_id|>"))


def _llama3_prompt(system: str | None, question: str, first: bool) -> list:
    def block(role, content):
        return [HEAD, Text(role), END_HEAD, Text("\n\n" + content), EOT]
    preamble = ([BEGIN] + (block("system", system) if system else [])) if first else []
    return preamble + block("user", question) + [HEAD, Text("assistant"), END_HEAD, Text("\n\n")]


LLAMA3 = PieceTemplate("llama3", _llama3_prompt, lambda a: [Text(a), EOT], stops=(EOT, END))

# ChatML (Qwen2, Qwen2.5 and many fine-tunes): `<|im_start|>{role}\n{content}<|im_end|>\n` per message; the
# generation prompt is `<|im_start|>assistant\n`. The "\n" after an answer's <|im_end|> is not supervised.
IM_START, IM_END = Special("<|im_start|>"), Special("<|im_end|>")


def _chatml_prompt(system: str | None, question: str, first: bool) -> list:
    def block(role, content):
        return [IM_START, Text(f"{role}\n{content}"), IM_END, Text("\n")]
    return (block("system", system) if system else []) + block("user", question) + [IM_START, Text("assistant\n")]


CHATML = PieceTemplate("chatml", _chatml_prompt, lambda a: [Text(a), IM_END], after=(Text("\n"),), stops=(IM_END,))

BUILTINS = {t.name: t for t in (LLAMA2, LLAMA3, CHATML)}
NAMES = ("auto", *BUILTINS)  # what TrainConfig.template and get_template take
