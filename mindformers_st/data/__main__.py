"""`python -m mindformers_st.data COMMAND`: build tokenizers and MindRecord datasets.

    train-tokenizer --input corpus.txt [...] --vocab_size 1024 --output tokenizer.json
    pretrain  --input corpus.txt [...] --tokenizer tokenizer.json --seq_length 64 --output wiki.mindrecord
    finetune  --input alpaca.json --tokenizer tokenizer.json --seq_length 128 --output alpaca.mindrecord
    make-corpus --output_dir DIR     (re-generate the shipped tiny corpus and Alpaca JSON)
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ..errors import MindformersSTError


def build_parser() -> argparse.ArgumentParser:
    """The parser of the data tool's subcommands."""
    parser = argparse.ArgumentParser(prog="python -m mindformers_st.data",
                                     description="Build tokenizers and MindRecord datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json")
    p.add_argument("--input", nargs="+", required=True, help="text files")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--output", required=True, help="tokenizer.json to write")

    p = sub.add_parser("pretrain", help="text files -> packed rows of seq_length+1 tokens")
    p.add_argument("--input", nargs="+", required=True, help="text files")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder holding one)")
    p.add_argument("--seq_length", type=int, required=True)
    p.add_argument("--output", required=True, help="MindRecord file to write")
    p.add_argument("--by_line", action="store_true", help="one document per line "
                   "(default: paragraphs separated by blank lines)")
    p.add_argument("--eos_token", default="</s>")

    p = sub.add_parser("finetune", help="Alpaca JSON -> input_ids + labels (prompt masked)")
    p.add_argument("--input", required=True, help="Alpaca-format JSON file")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq_length", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--pad_id", type=int, default=0)
    p.add_argument("--eos_token", default="</s>")

    p = sub.add_parser("make-corpus", help="write the generated tiny corpus and Alpaca JSON")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one data command; returns the exit code (1 with a message on a known error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train-tokenizer":
            from .tokenizer import train_bpe_tokenizer
            print(train_bpe_tokenizer(args.input, args.vocab_size, args.output))
        elif args.command == "pretrain":
            from .builders import pack_pretrain, read_documents
            from .mindrecord import write_mindrecord
            from .tokenizer import load_tokenizer
            rows = pack_pretrain(read_documents(args.input, args.by_line),
                                 load_tokenizer(args.tokenizer), args.seq_length, args.eos_token)
            write_mindrecord(args.output, {"input_ids": rows}, "pretrain tokens")
            print(f"{args.output}: {rows.shape[0]} rows of {rows.shape[1]} tokens")
        elif args.command == "finetune":
            from .builders import build_finetune, read_alpaca
            from .mindrecord import write_mindrecord
            from .tokenizer import load_tokenizer
            cols = build_finetune(read_alpaca(args.input), load_tokenizer(args.tokenizer),
                                  args.seq_length, args.pad_id, args.eos_token)
            write_mindrecord(args.output, cols, "alpaca finetune")
            print(f"{args.output}: {cols['input_ids'].shape[0]} rows of "
                  f"{cols['input_ids'].shape[1]} tokens (input_ids, labels)")
        elif args.command == "make-corpus":
            from .tiny_corpus import write_assets
            for kind, path in write_assets(args.output_dir, args.seed).items():
                print(f"{kind}: {path}")
    except MindformersSTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
