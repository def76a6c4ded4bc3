"""Chat data for LLaMA 2: the [INST] template, guanaco rows, tokenize-and-mask, collation, batching, loading.

Ids are built segment by segment (BOS id, prompt, answer, EOS id), never by tokenizing a rendered string:
sentencepiece pieces depend on what precedes them, the literal text "<s>" is not BOS, and HF turns a literal
"</s>" inside user text into a real EOS id unless told not to.

Inspect a dataset:  python -m minilora inspect rows.jsonl --tokenizer path/to/tokenizer [--max-len 1024]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

IGNORE = -100  # label of an unsupervised position (cross_entropy's ignore_index)
BOS, EOS, B_INST, E_INST = "<s>", "</s>", "[INST]", "[/INST]"  # literal markers, as written in guanaco rows
B_SYS, E_SYS = "<<SYS>>", "<</SYS>>"
ROW_FORM = ("rows look like '<s>[INST] question [/INST] answer </s>' "
            "or [{'role': 'user', 'content': ...}, {'role': 'assistant', 'content': ...}]")

Turn = dict  # {"role": "system" | "user" | "assistant", "content": str}
Pairs = list  # [(question, answer or None), ...]: None only for a last question that prompts generation


class MalformedRow(ValueError):
    """A row that is not a well-formed conversation. `reason` is short, to be counted; `index` is set by
    encode_rows."""

    def __init__(self, reason: str, row: Any):
        super().__init__(reason)
        self.reason, self.row, self.index = reason, row, None

    def __str__(self) -> str:
        excerpt = repr(self.row)
        excerpt = excerpt if len(excerpt) <= 100 else excerpt[:70] + " ... " + excerpt[-25:]
        where = "" if self.index is None else f" {self.index}"
        hint = "" if self.index is None else (
            "; TrainConfig(skip_malformed=True) or encode_rows(..., skip_malformed=True) skips and counts such "
            "rows, as examples/train_guanaco.py does unless --strict")
        return f"malformed row{where}: {self.reason}: {excerpt}; {ROW_FORM}{hint}"


class SkipExample(ValueError):
    """A well-formed row that leaves no supervised token under max_len; encode_rows counts it by `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    def bad(reason: str) -> MalformedRow:
        return MalformedRow(reason, text)

    parts = _MARKERS.split(text)  # [text, marker, text, marker, ..., text]
    if E_INST not in parts[1::2]:
        raise bad("no [/INST]")
    if parts[0].strip():
        raise bad("text before the first [INST]")
    seq = list(zip(parts[1::2], parts[2::2]))  # (marker, the text after it)
    turns, k = [], 0

    def expect(marker: str, what: str) -> str:
        got = seq[k][0] if k < len(seq) else "the end of the text"
        if got != marker:
            raise bad(f"unbalanced markers: expected {marker} {what}, found {got}")
        return seq[k][1]

    while k < len(seq):
        if seq[k][0] == BOS:
            if seq[k][1].strip():
                raise bad("text between <s> and [INST]")
            k += 1
        question = expect(B_INST, "to open a turn").strip()
        k += 1
        answer = expect(E_INST, "after the question").strip()
        k += 1
        if k == len(seq) and not answer:  # an open last question: a prompt for generation
            turns.append({"role": "user", "content": question})
            break
        after = expect(EOS, "after the answer")
        k += 1
        if after.strip():
            raise bad("text after the last </s>" if k == len(seq) else "text between </s> and the next turn")
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    first = turns[0]["content"]
    if first.startswith(B_SYS):
        system, sep, rest = first[len(B_SYS):].partition(E_SYS)
        if not sep:
            raise bad("<<SYS>> without <</SYS>>")
        turns[0]["content"] = rest.strip()
        turns.insert(0, {"role": "system", "content": system.strip()})
    _pairs(turns, text)  # roles out of order and the like are errors here already
    return turns


def _pairs(messages: Any, row: Any) -> tuple[str | None, Pairs]:
    """Check the roles and contents of a message list; return (system, [(question, answer), ...]), stripped.
    Empty contents are legal: an empty question is encoded as the template writes it, an empty answer is EOS."""
    if not isinstance(messages, (list, tuple)):
        raise MalformedRow("expected a guanaco string, a list of messages, or a dict with 'text' or 'messages'", row)
    system, pairs = None, []
    for j, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
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


def _conversation(row: Any) -> tuple[str | None, Pairs]:
    """(system, pairs) from any row form: guanaco text, a message list, or a dict with "text"/"messages"."""
    if isinstance(row, dict) and ("messages" in row or "text" in row):
        row = row["messages"] if "messages" in row else row["text"]
    if isinstance(row, str):
        return _pairs(parse_text(row), row)
    return _pairs(row, row)


# ---------------------------------------------------------------- token ids and labels

def _encode(tok, text: str) -> list[int]:
    # split_special_tokens: a literal "</s>" in user text stays text; without it, it would become EOS id 2
    return tok.encode(text, add_special_tokens=False, split_special_tokens=True)


def _segment(tok, question: str, answer: str | None, system: str | None) -> tuple[list[int], list[int]]:
    """One turn's ids: (BOS + prompt, answer + EOS). The answer is encoded on its own; sentencepiece's dummy
    "▁" prefix stands for the space after [/INST]."""
    prompt = [tok.bos_token_id] + _encode(tok, _prompt(question, system))
    return prompt, ([] if answer is None else _encode(tok, answer) + [tok.eos_token_id])


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
    segs = [_segment(tokenizer, q, a, system if k == 0 else None) for k, (q, a) in enumerate(pairs)]
    total = sum(len(p) + len(a) for p, a in segs)
    truncated = total > max_len
    while len(pairs) > 1 and total > max_len:
        pairs = pairs[1:]
        segs = [_segment(tokenizer, *pairs[0], system)] + segs[2:]
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
    ids = []
    for k, (q, a) in enumerate(pairs):
        prompt, answer = _segment(tokenizer, q, a, system if k == 0 else None)
        ids += prompt + answer
    return ids


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
            continue
        except SkipExample as e:
            stats.skipped[e.reason] += 1
            continue
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


# ---------------------------------------------------------------- batches

class Collator:
    """Batches examples into LongTensors, right-padded with pad_id; labels are -100 on padding by position,
    so a real EOS label survives pad_id == eos_id. Labels stay unshifted (the loss shifts them).

    pack=True fills each row with several examples (first fit, up to max_len or the longest example) and
    returns position_ids restarting at 0 per example and a (B, 1, T, T) boolean mask, True = may attend:
    causal and block-diagonal, so no token sees another example. transformers passes a 4D mask to SDPA as it
    is. Every example opens with BOS labelled -100, so after the shift no label crosses a boundary.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, pack: bool = False,
                 max_len: int | None = None):
        self.pad_id, self.multiple, self.pack, self.max_len = pad_id, pad_to_multiple_of, pack, max_len

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got no examples")
        rows = self._first_fit(examples) if self.pack else [[ex] for ex in examples]
        B, T = len(rows), max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        owner = torch.zeros((B, T), dtype=torch.long)  # 1 + the example's place in its row; 0 = padding
        for b, row in enumerate(rows):
            t = 0
            for k, ex in enumerate(row):
                n = len(ex["input_ids"])
                input_ids[b, t:t + n] = torch.tensor(ex["input_ids"])
                labels[b, t:t + n] = torch.tensor(ex["labels"])
                position_ids[b, t:t + n] = torch.arange(n)
                owner[b, t:t + n] = k + 1
                t += n
        if not self.pack:
            return {"input_ids": input_ids, "labels": labels, "attention_mask": (owner > 0).long()}
        # Padding shares owner 0, so a pad query sees itself (and earlier pads): no softmax row is empty (NaN).
        same = owner[:, :, None] == owner[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": (same & causal)[:, None]}  # (B, 1, T, T)

    def _first_fit(self, examples: list[dict]) -> list[list[dict]]:
        cap = max(self.max_len or 0, max(len(ex["input_ids"]) for ex in examples))
        rows, room = [], []
        for ex in examples:
            n = len(ex["input_ids"])
            b = next((b for b, r in enumerate(room) if r >= n), len(rows))
            if b == len(rows):
                rows.append([])
                room.append(cap)
            rows[b].append(ex)
            room[b] -= n
        return rows


def batches(examples: list[dict], batch_size: int, seed: int = 0, shuffle: bool = True,
            group_by_length: bool = False, epoch: int = 0) -> Iterator[list[dict]]:
    """Yield lists of batch_size examples (the last may be shorter), in an order that is a pure function of
    (seed, epoch): a resumed run skips the first k batches (itertools.islice) and sees the same data.

    group_by_length sorts by length within mega-batches of 50 batches, so that a batch wastes little
    padding, then shuffles the batch order so that long batches do not all come first.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = 50 * batch_size
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -len(examples[i]["input_ids"]))]
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        yield [examples[i] for i in chunk]


# ---------------------------------------------------------------- loading

_FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


def looks_local(name: str) -> bool:
    """Whether a name can only be a local path: a hub id is "name" or "owner/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_rows(source: str, split: str = "train", text_field: str = "text", messages_field: str = "messages") -> list:
    """Rows from a local .jsonl/.json/.parquet/.csv file or a hub id (datasets.load_dataset): the values of
    text_field (guanaco strings) or, when there is none, of messages_field (message lists).

    Invalid JSON is reported with the file and its line. A name that is neither a file here nor a dataset on
    the hub fails in seconds; a hub dataset loaded once before loads from the cache when the hub is out of
    reach or HF_HUB_OFFLINE=1.
    """
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext == ".jsonl":
            with open(source, encoding="utf-8") as f:  # lines count from 1, blank ones included, as in an editor
                records = [_json(line, source, n) for n, line in enumerate(f, 1) if line.strip()]
        elif ext == ".json":
            with open(source, encoding="utf-8") as f:
                records = _json(f.read(), source) if os.path.getsize(source) else []
        elif ext == ".parquet":
            import pyarrow.parquet as pq
            records = pq.read_table(source).to_pylist()
        elif ext == ".csv":
            with open(source, encoding="utf-8", newline="") as f:
                records = list(csv.DictReader(f))
        else:
            raise ValueError(f"cannot read {source!r}: use one of {', '.join(_FILE_TYPES)}")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{source!r} must hold a list of objects, one per row")
        fields = list(records[0]) if records else []
    elif not os.path.isdir(source) and (ext in _FILE_TYPES or looks_local(source)):
        raise FileNotFoundError(f"{source!r} does not exist; pass an existing file, or a hub id like owner/name")
    else:
        records = _load_dataset(source, split)
        fields = records.column_names
    if not len(records):
        raise ValueError(f"{source!r} has no rows")
    name = text_field if text_field in fields else messages_field
    if name not in fields:
        raise ValueError(f"{source!r} has neither {text_field!r} nor {messages_field!r}; its fields are {fields}; "
                       "pass text_field= or messages_field=")
    return list(records[name]) if not isinstance(records, list) else [r[name] for r in records]


def _json(text: str, source: str, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source!r}, line {line or e.lineno} column {e.colno}: invalid JSON ({e.msg}); "
                         "fix or remove that row") from None


def _load_dataset(source: str, split: str):
    """datasets.load_dataset(source, split=split) for a local dir or a hub id, or one clear error in seconds.

    The hub is asked once first: datasets retries an unreachable hub for over 20 s before it falls back to its
    cache, so when the hub does not answer, the cache is read at once.
    """
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    def missing(why: str) -> FileNotFoundError:
        return FileNotFoundError(f"{source!r} is not a file here and not a dataset on the hub ({why}); pass an "
                                 f"existing {'/'.join(_FILE_TYPES)} file, or a hub id like owner/name")

    offline = datasets.config.HF_HUB_OFFLINE
    if os.path.isdir(source):
        return datasets.load_dataset(source, split=split)
    if not offline:
        try:
            HfApi().dataset_info(source, timeout=10)
        except (RepositoryNotFoundError, HFValidationError) as e:
            raise missing(str(e).splitlines()[0]) from None
        except Exception:  # no answer: the network or the hub is down, and the cache may hold the dataset
            offline = True
    was_offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, offline
    try:
        return datasets.load_dataset(source, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError):
        why = "HF_HUB_OFFLINE=1" if was_offline else "the hub does not answer"
        raise missing(f"{why}, and the local cache does not hold it") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def check_eval_size(size: float | int) -> float | int:
    """Return size if split_eval takes it: a fraction strictly between 0 and 1, a whole number of rows, or 0."""
    fraction = isinstance(size, float) and 0 < size < 1
    count = isinstance(size, int) and not isinstance(size, bool) and size >= 0
    if not (fraction or count or size == 0):
        raise ValueError(f"eval size {size!r}: give a fraction strictly between 0 and 1 (0.05), a whole number of "
                         "rows (50), or 0 for no evaluation")
    return size


def split_eval(rows: list, size: float | int = 0.05, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a seeded random cut. size: a fraction strictly between 0 and 1 (at least one row is
    held out), a whole number of rows, or 0 for no eval split (all rows train)."""
    check_eval_size(size)
    n = max(1, round(len(rows) * size)) if isinstance(size, float) and size else int(size)
    if n >= len(rows):
        raise ValueError(f"eval size {size} holds out {n} of {len(rows)} rows; leave at least one row to train on")
    chosen = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


# ---------------------------------------------------------------- inspection CLI

def _show(ex: dict, tok, color: bool) -> str:
    """The example as text, then as pieces, with each supervised run marked."""
    mark = (lambda s: f"\033[32m{s}\033[0m") if color else (lambda s: f"«{s}»")
    plain = (lambda s: f"\033[2m{s}\033[0m") if color else (lambda s: s)
    runs = []  # [(supervised, ids)], contiguous
    for i, label in zip(ex["input_ids"], ex["labels"]):
        if runs and runs[-1][0] == (label != IGNORE):
            runs[-1][1].append(i)
        else:
            runs.append((label != IGNORE, [i]))
    text = "".join((mark if sup else plain)(tok.decode(ids)) for sup, ids in runs)
    pieces = " ".join((mark if sup else plain)(" ".join(tok.convert_ids_to_tokens(ids))) for sup, ids in runs)
    return f"{text}\n  pieces: {pieces}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show encoded examples, supervised tokens marked, and dataset totals")
    p.add_argument("source", help="a .jsonl/.json/.parquet/.csv file or a hub dataset id")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or hub id")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--n", type=int, default=3, help="examples to show")
    p.add_argument("--split", default="train")
    p.add_argument("--skip-malformed", action="store_true")
    args = parser.parse_args(argv)

    from .model import load_tokenizer
    try:
        tok = load_tokenizer(args.tokenizer)
        examples, stats = encode_rows(load_rows(args.source, args.split), tok, args.max_len, args.skip_malformed)
    except (OSError, ValueError) as e:  # a bad file, row or tokenizer: the message names it and what to do
        parser.exit(2, f"error: {e}\n")
    color = sys.stdout.isatty()
    for k, ex in enumerate(examples[:args.n]):
        print(f"--- example {k}{' (truncated)' if ex['truncated'] else ''}\n{_show(ex, tok, color)}\n")
    print(f"rows: {stats.rows}\nturns: {stats.turns}\ntokens: {stats.tokens}\nsupervised tokens: {stats.supervised}"
          f"\ntruncated rows: {stats.truncated}\nempty questions: {stats.empty_questions}\nempty answers: "
          f"{stats.empty_answers}\nskipped rows: {sum(stats.skipped.values())}")
    for reason, count in stats.skipped.most_common():
        print(f"  {count:6d}  {reason}")
    if stats.malformed:
        print("malformed rows: " + ", ".join(str(i) for i, _ in stats.malformed[:20])
              + (" ..." if len(stats.malformed) > 20 else ""))
    width = max(1, args.max_len // 8)
    hist = Counter(len(ex["input_ids"]) // width for ex in examples)
    print("token lengths:")
    for b in range(min(hist), max(hist) + 1):
        print(f"  {b * width:6d}-{(b + 1) * width:<6d} {hist[b]:6d} {'#' * round(40 * hist[b] / max(hist.values()))}")


if __name__ == "__main__":
    main()
