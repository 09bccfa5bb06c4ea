"""The `mindformers-st` offline tool: one subcommand per module in `mindformers_st.commands`.

Each command module provides `register(subparsers)`, which adds its parser and sets
`func(args) -> int` (the exit code).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Callable, List, Optional

from .errors import MindformersSTError, os_error_text

# module name in mindformers_st.commands, in the order `--help` lists them
COMMAND_MODULES = [
    "inspect", "verify", "merge", "split", "reshard",
    "convert_hf", "export_hf", "ckpt_to_safetensors", "convert_layout",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="mindformers-st", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"mindformers_st.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_reporting(args.command, lambda: args.func(args), "nothing was written")


def run_reporting(name: str, func: Callable[[], Optional[int]], after_signal: str) -> int:
    """Run `func()` and turn every way it can fail into one `error:` line on stderr and an exit
    code: 1 for our errors and refused file-system writes (the path and the reason), 143 for
    SIGTERM and 130 for SIGINT (`after_signal` says what was left behind), 0 when stdout's
    reader went away (`... | head`). The one place the offline tools and run_mindformer.py
    report failures; returns func's code (0 for None)."""
    # SIGTERM unwinds like Ctrl-C, so the engine removes its staging folder on the way out.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(func() or 0)
    except MindformersSTError as exc:
        _error_line(str(exc))
        return 1
    except BrokenPipeError:   # `mindformers-st inspect ... | head`: the reader left
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except OSError as exc:   # the file system refused (full, read-only, a file in the way)
        _error_line(os_error_text(exc))
        return 1
    except _Terminated:
        _error_line(f"{name}: terminated (SIGTERM); {after_signal}")
        return 143
    except KeyboardInterrupt:
        _error_line(f"{name}: interrupted; {after_signal}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_line(text: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(f"error: {text}", file=sys.stderr, flush=True)


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM (a BaseException: cleanup handlers run, ordinary
    `except Exception` blocks do not swallow it)."""


def _terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
