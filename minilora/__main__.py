"""`python -m minilora inspect SOURCE --tokenizer DIR [--max-len 1024] [--template auto]`: the data inspector.

It loads the rows and encodes them as training does, under the chat template training uses, prints the first
examples with each supervised run marked, then the dataset's totals and a histogram of token lengths.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from itertools import groupby

from .data import load_rows
from .model import load_tokenizer
from .chat_templates import NAMES
from .template import IGNORE, encode_rows


def _show(ex: dict, tok) -> str:
    """The example as text, then as pieces, with each supervised run marked (in colour on a terminal)."""
    mark, plain = ("\033[32m{}\033[0m", "\033[2m{}\033[0m") if sys.stdout.isatty() else ("«{}»", "{}")
    groups = groupby(zip(ex["input_ids"], ex["labels"]), key=lambda pair: pair[1] != IGNORE)
    runs = [(supervised, [i for i, _ in run]) for supervised, run in groups]  # [(supervised, ids)], contiguous
    text = "".join((mark if sup else plain).format(tok.decode(ids)) for sup, ids in runs)
    pieces = " ".join((mark if sup else plain).format(" ".join(tok.convert_ids_to_tokens(ids))) for sup, ids in runs)
    return f"{text}\n  pieces: {pieces}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilora", description=(
        "Inspect chat data: encoded examples with their supervised tokens marked, and the totals."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show encoded examples, supervised tokens marked, and dataset totals")
    p.add_argument("source", help="a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub dataset id")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or hub id")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--template", default="auto", choices=NAMES, help="the chat template: auto (the tokenizer's own, "
                   "else llama2), or a built-in")
    p.add_argument("--n", type=int, default=3, help="examples to show")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text", help="the field of guanaco-format strings")
    p.add_argument("--messages-field", default="messages", help="the field of message lists, read when a row "
                   "has no --text-field")
    p.add_argument("--skip-malformed", action="store_true")
    args = parser.parse_args(argv)

    try:
        tok = load_tokenizer(args.tokenizer)
        rows = load_rows(args.source, args.split, args.text_field, args.messages_field)
        examples, stats = encode_rows(rows, tok, args.max_len, args.skip_malformed, args.template)
    except (OSError, ValueError) as e:  # a bad file, row or tokenizer: the message names it and what to do
        parser.exit(2, f"error: {e}\n")
    for k, ex in enumerate(examples[:args.n]):
        print(f"--- example {k}{' (truncated)' if ex['truncated'] else ''}\n{_show(ex, tok)}\n")
    print(f"template: {stats.template}\nrows: {stats.rows}\nturns: {stats.turns}\ntokens: {stats.tokens}"
          f"\nsupervised tokens: {stats.supervised}\ntruncated rows: {stats.truncated}\nempty questions: "
          f"{stats.empty_questions}\nempty answers: {stats.empty_answers}\nskipped rows: {sum(stats.skipped.values())}")
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
