"""Talk to a base model plus a LoRA adapter (minilora's or PEFT's) in the chat template it was trained with.

    python examples/chat.py --model out/tiny/base --adapter out/tiny/adapter --prompt "Which is bigger, 3 or 8?"
    python examples/chat.py --model NousResearch/Llama-2-7b-chat-hf --adapter out/adapter   # interactive
    python examples/chat.py --model out/tiny/base --adapter out/tiny/adapter --save-merged out/tiny/merged
    python examples/chat.py --model out/tiny/merged --prompt "Which is bigger, 3 or 8?"   # the merged model alone
    python examples/chat.py --model meta-llama/Llama-2-70b-hf --adapter out/adapter --stream   # larger than the card
"""

import argparse
import os
import sys

import torch

import minilora as ml
from minilora.adapter import check_adapter, save_template, saved_template
from minilora.config import PRECISIONS, default_precision
from minilora.host_load import load_streamed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local dir of the base model")
    p.add_argument("--adapter", help="adapter dir (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--prompt", help="answer this one message and exit; without it, chat interactively")
    p.add_argument("--system", help="system prompt for the conversation")
    p.add_argument("--template", choices=ml.TEMPLATES, help="the chat template to answer in; default: the one "
                   "train() recorded beside the adapter (or in a merged --model dir), else auto (the tokenizer's "
                   "own, else llama2)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the (dequantized) weights first")
    p.add_argument("--save-merged", metavar="DIR",
                   help="fold the adapter in and write the model with its tokenizer to DIR, a checkpoint that "
                        "--model DIR loads alone; then answer --prompt, if given")
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    p.add_argument("--stream", action="store_true",
                   help="keep the 4-bit weights in host memory and copy each layer to the GPU as it runs: a model "
                        "larger than the card (every new token then copies all of them)")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="default: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on a CPU")
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        p.error("--prompt is empty; give a message, or leave --prompt out to chat interactively")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if (args.merge or args.save_merged) and not args.adapter:
        p.error("--merge and --save-merged fold an adapter in: give --adapter DIR")
    if args.stream and (args.merge or args.save_merged or args.quant == "none"):
        p.error("--stream streams 4-bit weights, which stay unmerged: leave out --merge, --save-merged and "
                "--quant none")
    try:  # before the model loads: an adapter dir that is not one fails in a second
        if args.adapter:
            check_adapter(args.adapter)
        trained = saved_template(args.adapter or args.model)  # None for a hub id, or a dir without the record
        if args.save_merged and os.path.exists(os.path.join(args.save_merged, "config.json")):
            raise ValueError(f"{args.save_merged} already holds a model; choose another --save-merged dir")
    except (OSError, ValueError) as e:
        p.exit(2, f"error: {e}\n")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = PRECISIONS[args.precision or default_precision(device)]
    try:  # streamed: each linear quantized on the device and parked in host memory (host_load.py)
        model, tok = (load_streamed if args.stream else ml.load_model)(
            args.model, quant=None if args.quant == "none" else args.quant, compute_dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        p.exit(2, f"error: could not load model {args.model!r}: {str(e).splitlines()[0]}\n")
    try:  # the template, and the special tokens it needs in this tokenizer
        template = chat_template(args.template, trained, tok)
        ml.encode_prompt([{"role": "user", "content": "hi"}], tok, template)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    if args.adapter:
        ml.load_adapter(model, args.adapter)
        if args.save_merged:
            print(f"merged model and tokenizer: {ml.save_merged(model, tok, args.save_merged)}")
            save_template(args.save_merged, trained or template.name)
        elif args.merge:
            ml.merge_lora(model)
    if args.stream:  # the fast layers read the streamed weights (kernels/stream.py)
        ml.prepare_for_training(model, fast=True, gradient_checkpointing=True, stream=True)
    model.eval()

    turns = [{"role": "system", "content": args.system}] if args.system else []

    def answer(message: str) -> str:
        turns.append({"role": "user", "content": message})
        reply = ml.generate(model, tok, turns, args.max_new_tokens, template=template)  # in the model's dtype
        turns.append({"role": "assistant", "content": reply})  # an empty reply is a turn too
        return reply

    if args.prompt is not None or args.save_merged:
        if args.prompt is not None:
            print(answer(args.prompt))
        return 0
    print("chatting; an empty line or Ctrl-D ends")
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        print(f"bot> {answer(message)}")
    return 0


def chat_template(asked: str | None, trained: str | None, tok) -> ml.Template:
    """The template to answer in: the one asked for (--template), else the one the weights were trained under
    (recorded by train(): a built-in's name, or "jinja:<hash>" for the tokenizer's own), else auto."""
    if asked is not None:
        template = ml.get_template(asked, tok)
        if trained is not None and template.name != trained:
            print(f"warning: the weights were trained under the chat template {trained!r}; answering in "
                  f"{template.name!r} as --template asks", file=sys.stderr)
        return template
    if trained is None:
        return ml.get_template("auto", tok)
    if trained in ml.TEMPLATES:
        return ml.get_template(trained, tok)
    own = ml.get_template("auto", tok) if trained.startswith("jinja:") else None
    if own is None or own.name != trained:
        raise ValueError(f"the weights were trained under the chat template {trained!r}, which this model's "
                         "tokenizer does not have; pass --template")
    return own


if __name__ == "__main__":
    sys.exit(main())
