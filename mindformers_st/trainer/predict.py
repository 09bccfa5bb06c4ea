"""The predict loop: tokenize prompts, generate in batches, print and save the texts.

Decoding options come from model_config (do_sample, top_k, top_p, temperature,
max_decode_length, eos/pad ids). Every rank runs the whole batch (tensor parallel ranks
cooperate inside the model); rank 0 prints `'text_generation_text': [...]` as MindSpore
Transformers does and writes `{output_dir}/predict/results.json`, a list of
`{prompt, input_ids, output_ids, text}`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

from ..errors import ConfigError, write_failed

logger = logging.getLogger(__name__)


def run_predict(config, resolved, ctx) -> List[Dict]:
    """Generate for `config.predict_data`; returns the result records (on every rank)."""
    from .resolve import tokenizer_file
    from ..data.tokenizer import load_tokenizer
    from ..storage.index import atomic_write_text
    from .generate import generate
    from .train import build_model, start_async_load

    prompts = list(config.predict_data)
    if not prompts:
        raise ConfigError("run_mode predict needs prompts: pass --predict_data 'text' ['text' ...]")
    tok_path = tokenizer_file(config, resolved)
    if tok_path is None:
        raise ConfigError("predict needs a tokenizer: set processor.tokenizer.tokenizer_file to a "
                          "tokenizer.json, or load_checkpoint an HF folder that has one")
    tok = load_tokenizer(tok_path)
    mc = resolved.config
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but "
                          f"model_config.vocab_size is {mc.vocab_size}")
    prompt_ids = [tok.encode(p) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        # As MindSpore Transformers (text_generator: "The max_length set is smaller than the
        # length in the input_ids"): an error, not a silent empty generation or a truncation.
        if len(ids) > mc.max_decode_length:
            raise ConfigError(
                f"--predict_data prompt {i + 1} of {len(prompt_ids)} is {len(ids)} tokens long, "
                f"more than model_config.max_decode_length {mc.max_decode_length} (prompt plus "
                f"generated tokens): shorten it or raise max_decode_length")
    pending = start_async_load(config, resolved, ctx, with_optimizer=False)
    model = build_model(config, resolved, ctx)
    if config.load_checkpoint:
        from ..checkpoint.hook import load_weights
        load_weights(model, ctx, config, pending=pending)
    else:
        logger.warning("load_checkpoint is empty: predicting with randomly initialised weights")
    model.set_train(False)

    batch = config.predict_batch_size or len(prompts)
    longest = max(len(p) for p in prompt_ids)
    # max_decode_length bounds prompt + generated tokens, as in MindSpore Transformers
    max_new = max(0, mc.max_decode_length - longest)
    eos = mc.eos_token_ids
    results: List[Dict] = []
    for start in range(0, len(prompts), batch):
        chunk = prompt_ids[start:start + batch]
        outs = generate(model, ctx, chunk, max_new, do_sample=mc.do_sample, top_k=mc.top_k,
                        top_p=mc.top_p, temperature=mc.temperature, eos_token_id=eos,
                        pad_token_id=mc.pad_token_id, seed=config.seed,
                        repetition_penalty=mc.repetition_penalty)
        for prompt, ids, out in zip(prompts[start:start + batch], chunk, outs):
            results.append({"prompt": prompt, "input_ids": list(map(int, ids)),
                            "output_ids": list(map(int, out)), "text": tok.decode(out)})
    if ctx.is_main:
        texts = [r["text"] for r in results]
        print({"text_generation_text": texts}, flush=True)
        folder = os.path.join(config.output_dir, "predict")
        path = os.path.join(folder, "results.json")
        try:
            os.makedirs(folder, exist_ok=True)
            atomic_write_text(path, json.dumps(results, ensure_ascii=False, indent=1) + "\n")
        except OSError as exc:
            raise write_failed("predict results", path, exc) from exc
        print(f"predict results written to {path}", flush=True)
    return results
