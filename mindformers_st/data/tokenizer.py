"""Tokenizers from Hugging Face `tokenizer.json` files (the `tokenizers` library), and a small BPE
trainer for the tiny demo.

`Tokenizer.encode` applies the file's own post-processor (Llama's adds `<s>`), so prompts are
tokenized the way the model was trained. No MindSpore here.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, List, Optional, Sequence

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# the tiny tokenizer's special tokens, in id order, matching Llama's ids (unk 0 = pad, bos 1, eos 2)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


class Tokenizer:
    """A loaded `tokenizer.json`: encode/decode plus the bos/eos/pad ids it knows."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer file {path!r} does not exist; set "
                              f"processor.tokenizer.tokenizer_file to a tokenizer.json (build the "
                              f"tiny one with `python -m mindformers_st.data train-tokenizer`)")
        try:
            self._tok = HFTokenizer.from_file(path)
        except Exception as exc:  # the library raises plain Exception subclasses
            raise ConfigError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: Optional[str]) -> Optional[int]:
        """The id of `token`, or None when the vocabulary lacks it."""
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of `text` (with the file's special-token post-processing by default)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        """`encode` for many texts at once (parallel inside the library)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts),
                                                             add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer stored in `path` (a tokenizer.json or a folder holding one)."""
    return Tokenizer(path)


def train_bpe_tokenizer(files: Sequence[str], vocab_size: int, output: str) -> str:
    """Train a byte-level BPE tokenizer on text `files` and save it as `output` (tokenizer.json).

    Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>` (Llama's unk/pad, bos, eos); encoding prepends `<s>`.
    Deterministic for the same files and vocab_size. Returns the written path.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 300:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE (>= 300: "
                          f"256 bytes, the special tokens and some merges)")
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(f) for f in files], trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tok.save(output)
    logger.info("trained BPE tokenizer: %d tokens -> %s", tok.get_vocab_size(), output)
    return output
