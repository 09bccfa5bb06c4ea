"""Dataset builders: text files -> packed pretraining rows; Alpaca JSON -> finetuning rows.

Pretraining: every document (a blank-line separated paragraph, or a line with --split lines) is
tokenized (with the tokenizer's bos), followed by eos, concatenated, and cut into rows of
`seq_length + 1` tokens (the model reads tokens[:-1] and predicts tokens[1:]); the tail shorter
than a row is dropped.

Finetuning: each Alpaca record {instruction, input, output} becomes the Stanford Alpaca prompt
followed by the output and eos, truncated/padded to `seq_length + 1`; `labels` repeats the ids
with the prompt and the padding replaced by -100 (ignored by the loss).
"""
from __future__ import annotations

import json
import logging
from typing import Dict, Iterable, List, Sequence

import numpy as np

from ..errors import ConfigError
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def read_documents(paths: Sequence[str], by_line: bool = False) -> List[str]:
    """Documents of the text files: paragraphs separated by blank lines (or single lines)."""
    docs: List[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        parts = text.splitlines() if by_line else text.split("\n\n")
        docs.extend(p.strip() for p in parts if p.strip())
    if not docs:
        raise ConfigError(f"no text found in {list(paths)}")
    return docs


def pack_pretrain(docs: Iterable[str], tok: Tokenizer, seq_length: int,
                  eos_token: str = "</s>") -> np.ndarray:
    """[N, seq_length + 1] int32 rows of the concatenated, eos-separated documents."""
    eos = tok.token_id(eos_token)
    if eos is None:
        raise ConfigError(f"tokenizer {tok.path} has no eos token {eos_token!r}; pass --eos_token")
    row = seq_length + 1
    stream: List[int] = []
    for ids in tok.encode_batch(list(docs)):
        stream.extend(ids)
        stream.append(eos)
    n = len(stream) // row
    if n == 0:
        raise ConfigError(f"the text gives {len(stream)} tokens, fewer than one row of "
                          f"{row}; use more text or a smaller --seq_length")
    logger.info("packed %d tokens into %d rows of %d (%d dropped)", len(stream), n, row,
                len(stream) - n * row)
    return np.asarray(stream[:n * row], np.int32).reshape(n, row)


def alpaca_prompt(record: Dict[str, str]) -> str:
    """The Stanford Alpaca prompt of one record (with or without `input`)."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def read_alpaca(path: str) -> List[Dict[str, str]]:
    """The records of an Alpaca-format JSON file (a list of {instruction, input, output})."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read Alpaca JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of {{instruction, input, output}}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise ConfigError(f"{path}: record {i} needs 'instruction' and 'output' keys")
    return data


def build_finetune(records: Sequence[Dict[str, str]], tok: Tokenizer, seq_length: int,
                   pad_id: int = 0, eos_token: str = "</s>") -> Dict[str, np.ndarray]:
    """`input_ids` and `labels`, [N, seq_length + 1] int32 each, for Alpaca records."""
    eos = tok.token_id(eos_token)
    if eos is None:
        raise ConfigError(f"tokenizer {tok.path} has no eos token {eos_token!r}; pass --eos_token")
    row = seq_length + 1
    ids_rows, label_rows, truncated = [], [], 0
    for rec in records:
        prompt = tok.encode(alpaca_prompt(rec))
        answer = tok.encode(rec["output"], add_special_tokens=False) + [eos]
        ids = (prompt + answer)[:row]
        truncated += len(prompt) + len(answer) > row
        labels = [IGNORE_INDEX] * min(len(prompt), row) + ids[len(prompt):]
        pad = row - len(ids)
        ids_rows.append(ids + [pad_id] * pad)
        label_rows.append(labels + [IGNORE_INDEX] * pad)
    if truncated:
        logger.warning("%d of %d records were longer than %d tokens and were truncated",
                       truncated, len(records), row)
    return {"input_ids": np.asarray(ids_rows, np.int32), "labels": np.asarray(label_rows, np.int32)}
