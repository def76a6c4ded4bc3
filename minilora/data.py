"""Loading rows from files and hub datasets, the eval split, and batching: Collator (padding and packing),
batches and packs. Chat templates and tokenize-and-mask are in template.py.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
from typing import Iterator

import torch

from .loss import supervised_count
from .conversation import row_field
from .template import IGNORE, DataStats, encode_rows, get_template


# ---------------------------------------------------------------- batches

class Collator:
    """Batches examples into LongTensors, right-padded with pad_id; labels are -100 on padding by position,
    so a real EOS label survives pad_id == eos_id. Labels stay unshifted (the loss shifts them).

    pack_tokens: lay all the examples out in one row of exactly this many tokens instead (a packed micro-batch:
    one shape, whatever the examples). Each example's position_ids restart at 0, and "segment_starts" (int32)
    says where each begins, so that attention stays inside it (kernels/attention.py); the padding after the last
    example forms examples of its own, at most max_len tokens each, with no labels. segment_starts has a power
    of two entries plus one (empty examples at the end), so that packs of similar counts share a CUDA graph;
    "segment_longest" (max_len) bounds every example's length. Every example opens with BOS labelled -100, so
    after the shift no label crosses a boundary.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None, pack_tokens: int | None = None,
                 max_len: int | None = None):
        self.pad_id, self.multiple, self.pack_tokens, self.max_len = pad_id, pad_to_multiple_of, pack_tokens, max_len

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got no examples")
        if self.pack_tokens:
            return self._pack(examples)
        B, T = len(examples), max(len(ex["input_ids"]) for ex in examples)
        if self.multiple:
            T = -(-T // self.multiple) * self.multiple
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[b, :n] = torch.tensor(ex["input_ids"])
            labels[b, :n] = torch.tensor(ex["labels"])
            mask[b, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    def _pack(self, examples: list[dict]) -> dict:
        T, longest = self.pack_tokens, self.max_len or self.pack_tokens
        lengths = [len(ex["input_ids"]) for ex in examples]
        if sum(lengths) > T or max(lengths) > longest:
            raise ValueError(f"examples of {lengths} tokens do not pack into one row of pack_tokens={T} with none "
                             f"over max_len={longest}; pack them with data.packs, or raise pack_tokens")
        pad = T - sum(lengths)
        lengths += [longest] * (pad // longest) + ([pad % longest] if pad % longest else [])  # the padding's examples
        ids = [t for ex in examples for t in ex["input_ids"]] + [self.pad_id] * pad
        labels = [t for ex in examples for t in ex["labels"]] + [IGNORE] * pad
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        starts += [T] * ((1 << (len(lengths) - 1).bit_length()) - len(lengths))  # 2^k examples in all
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
                "segment_starts": torch.tensor(starts, dtype=torch.int32), "segment_longest": longest}


def packs(examples: list[dict], tokens: int, seed: int = 0, epoch: int = 0, window: int = 16) -> list[list[dict]]:
    """The examples in packs of at most `tokens` tokens each, in an order that is a pure function of (seed,
    epoch), every example once: in a shuffled order, each goes into the first of the last `window` packs with
    room for it, or opens a new one. On guanaco's lengths at 4 x 1024 tokens a pack, 98 packs hold what 97.3
    would at best; examples of one length fill each pack in the shuffled order, as `batches` would batch them."""
    order = list(range(len(examples)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    groups, room = [], []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > tokens:
            raise ValueError(f"an example has {n} tokens, more than a pack's {tokens}: give packs at least the "
                             "longest example's tokens")
        k = next((k for k in range(max(0, len(groups) - window), len(groups)) if room[k] >= n), len(groups))
        if k == len(groups):
            groups.append([])
            room.append(tokens)
        groups[k].append(examples[i])
        room[k] -= n
    return groups


def batches(examples: list[dict], batch_size: int, seed: int = 0, group_by_length: bool = False,
            epoch: int = 0) -> Iterator[list[dict]]:
    """Yield lists of batch_size examples (the last may be shorter), in an order that is a pure function of
    (seed, epoch): a resumed run skips the first k batches (itertools.islice) and sees the same data.

    group_by_length sorts by length within mega-batches of 50 batches, so that a batch wastes little
    padding, then shuffles the batch order so that long batches do not all come first.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    if group_by_length:
        mega = 50 * batch_size
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -len(examples[i]["input_ids"]))]
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(chunks)
    for chunk in chunks:
        yield [examples[i] for i in chunk]


# ---------------------------------------------------------------- loading

_FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


def encoded(rows, tokenizer, max_len: int, skip_malformed: bool = False, template="auto", day: str | None = None
            ) -> tuple[list[dict], DataStats]:
    """(examples, stats): encode_rows' result as it is (checked against max_len, the template and the day), or rows
    encoded under the template (a name or a Template, as encode_rows takes), dated `day` if it writes the date."""
    chat = get_template(template, tokenizer)
    if not (isinstance(rows, tuple) and len(rows) == 2 and isinstance(rows[1], DataStats)):
        return encode_rows(rows, tokenizer, max_len, skip_malformed, chat.dated(day))
    name = chat.name
    if rows[1].template and rows[1].template != name:  # generation would then prompt in another template
        raise ValueError(f"the examples were encoded with template {rows[1].template!r}, and template={template!r} "
                         f"is {name!r} for this tokenizer; pass the template they were encoded with (TrainConfig("
                         f"template=...)), or encode_rows with template={template!r}")
    if day and rows[1].day and rows[1].day != day:  # the resumed run's examples wrote another date
        raise ValueError(f"the examples were encoded with the chat template's date {rows[1].day}, and the run they "
                         f"resume began on {day}; encode_rows with template=get_template({template!r}, tokenizer)"
                         f".dated({day!r})")
    longest = max(len(ex["input_ids"]) for ex in rows[0])
    if longest > max_len:
        raise ValueError(f"an encoded example has {longest} tokens, more than max_len={max_len}; "
                         "encode_rows with the max_len of the TrainConfig")
    empty = [i for i, ex in enumerate(rows[0]) if not supervised_count(ex["labels"])]
    if empty:  # a step of such examples would divide a zero loss by zero supervised tokens
        raise ValueError(f"encoded examples {empty[:5]} supervise no token (every label is -100 after the "
                         "first); drop them, as encode_rows does")
    return rows


def looks_local(name: str) -> bool:
    """Whether a name can only be a local path: a hub id is "name" or "owner/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_rows(source: str, split: str = "train", text_field: str = "text", messages_field: str = "messages") -> list:
    """Rows from a local .jsonl/.json/.parquet/.csv file, a directory of such files, or a hub id
    (datasets.load_dataset). Each row is judged on its own: the value of its text_field (a guanaco string), else of
    its messages_field (a message list), else the record as it is, which encode_rows counts as malformed. A source
    in which no row has either field is refused.

    A UTF-8 byte-order mark is skipped; a byte that is not UTF-8 and invalid JSON are reported with the file
    and its line. A name that is neither a file here nor a dataset on the hub fails in seconds; a hub dataset
    loaded once before loads from the cache when the hub is out of reach or HF_HUB_OFFLINE=1.
    """
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        records = _read_file(source, ext)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{source!r} must hold a list of objects, one per row")
    elif not os.path.isdir(source) and (ext in _FILE_TYPES or looks_local(source)):
        raise FileNotFoundError(f"{source!r} does not exist; pass an existing file, or a hub id like owner/name")
    else:
        records = list(_load_dataset(source, split))  # a dict per row, None where a row lacks a column
    if not records:
        raise ValueError(f"{source!r} has no rows")
    names = [row_field(r, text_field, messages_field) for r in records]
    if not any(names):
        fields = list(dict.fromkeys(k for r in records for k, v in r.items() if v is not None))
        raise ValueError(f"{source!r} has neither {text_field!r} nor {messages_field!r}; its fields are {fields}; "
                         "name the field with text_field= or messages_field= (--text-field or --messages-field)")
    return [r if name is None else r[name] for r, name in zip(records, names)]


def _read_file(source: str, ext: str):
    """What a local file holds: a list of records, or for .json whatever JSON value it is."""
    if ext == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(source).to_pylist()
    if ext not in _FILE_TYPES:
        raise ValueError(f"cannot read {source!r}: use one of {', '.join(_FILE_TYPES)}")
    text = _read_text(source)
    if ext == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    lines = io.StringIO(text, newline=None)  # \r\n and \r read as \n
    if ext == ".jsonl":  # lines count from 1, blank ones included, as in an editor
        if _is_array(text):
            raise ValueError(f"{source!r} holds one JSON array, not one JSON object per line; rename it to .json, "
                             "or write one object per line")
        return [_json(line, source, n) for n, line in enumerate(lines, 1) if line.strip()]
    return _json(lines.read(), source) if text else []


def _read_text(source: str) -> str:
    """A text file decoded as UTF-8, without its byte-order mark if it has one. A byte that is not UTF-8 is
    named with its line and column, lines ending in \\n, \\r\\n or \\r as in an editor."""
    with open(source, "rb") as f:
        data = f.read().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        raise ValueError(f"{source!r}, line {len(before)}: not UTF-8 (byte 0x{data[e.start]:02x} at column "
                         f"{len(before[-1]) + 1}); save the file as UTF-8") from None


def _is_array(text: str) -> bool:
    """Whether text is one JSON array (a .json file's content saved as .jsonl)."""
    try:
        return text.lstrip().startswith("[") and isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


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
        try:
            return datasets.load_dataset(source, split=split)
        except (datasets.data_files.EmptyDatasetError, datasets.exceptions.DataFilesNotFoundError):
            raise ValueError(f"{source!r} is a directory with no data files that can be read; pass a "
                             f"{'/'.join(_FILE_TYPES)} file, or a directory of such files") from None
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
