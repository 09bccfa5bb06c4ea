"""Command-line options several commands share, spelled once: which save to read (`--step`)
and how much of what is read is checked against the recorded checksums (`--verify`)."""
from __future__ import annotations

import argparse


def add_step_arg(p: argparse.ArgumentParser) -> None:
    """`--step EPOCH_STEP` (alias `--file-suffix`): which save of a rank_x/ folder to read."""
    p.add_argument("--step", "--file-suffix", dest="step", default=None, metavar="EPOCH_STEP",
                   help="which save of a rank_x/ folder (default: the newest committed one; "
                        "without committed.json the newest every rank holds)")


def add_verify_args(p: argparse.ArgumentParser) -> None:
    """`--verify {read,full,off}` and `--no-verify`: checksum checking of the bytes read."""
    p.add_argument("--verify", choices=["read", "full", "off"], default="read",
                   help="check recorded checksums: 'read' (default) every source tensor the "
                        "plan reads whole; 'full' every source tensor it touches, reading all "
                        "of it; 'off' none")
    p.add_argument("--no-verify", dest="verify", action="store_const", const="off",
                   help="same as --verify off")
