"""The train loop on one card: the tiny Llama's loss visibly drops, callbacks see every step,
and a CheckpointMonitor-free config trains without saving."""
import os

import numpy as np
import pytest

from mindformers_st.config import load_config
from mindformers_st.trainer.resolve import parallel_config_of, resolve_model
from mindspore.train import Callback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Recorder(Callback):
    """A plain MindSpore callback: what Model.train would give it, our loop gives it too."""

    def __init__(self):
        self.events = []

    def on_train_begin(self, run_context):
        self.events.append(("begin", run_context.original_args().cur_step_num))

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        self.events.append(("step", cb.cur_step_num, cb.cur_epoch_num, cb.batch_num))

    def on_train_end(self, run_context):
        self.events.append(("end", run_context.original_args().cur_step_num))


@pytest.mark.slow
def test_tiny_pretrain_lowers_the_loss(tmp_path, monkeypatch):
    from mindformers_st.data.builders import pack_pretrain, read_documents
    from mindformers_st.data.mindrecord import write_mindrecord
    from mindformers_st.data.tiny_corpus import CORPUS_FILE
    from mindformers_st.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from mindformers_st.parallel.context import init_parallel
    from mindformers_st.trainer import callbacks as cb_mod
    from mindformers_st.trainer.train import run_train

    tok = str(tmp_path / "tokenizer.json")
    train_bpe_tokenizer([CORPUS_FILE], 512, tok)
    rows = pack_pretrain(read_documents([CORPUS_FILE])[:300], load_tokenizer(tok), 32)
    data = write_mindrecord(str(tmp_path / "wiki.mindrecord"), {"input_ids": rows})
    cfg = load_config(os.path.join(ROOT, "configs/llama2/pretrain_llama2_tiny.yaml"), [
        ("use_parallel", "False"), ("train_dataset.data_loader.dataset_dir", data),
        ("output_dir", str(tmp_path / "out")), ("model.model_config.seq_length", "32"),
        ("runner_config.train_steps", "30"), ("callbacks", [{"type": "MFLossMonitor",
                                                             "per_print_times": 10}])])
    rec = Recorder()
    real = cb_mod.build_callbacks
    monkeypatch.setattr("mindformers_st.trainer.train.build_callbacks",
                        lambda c: real(c) + [rec])
    resolved = resolve_model(cfg)
    ctx = init_parallel(parallel_config_of(cfg), False, "CPU", cfg.seed)
    state = run_train(cfg, resolved, ctx)
    losses = state.losses
    print("tiny pretrain losses:", [round(x, 3) for x in losses])
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0      # e.g. 6.2 -> 4.x
    assert rec.events[0] == ("begin", 0) and rec.events[-1] == ("end", 30)
    assert [e[1] for e in rec.events if e[0] == "step"] == list(range(1, 31))
    assert os.path.isfile(tmp_path / "out" / "strategy" / "ckpt_strategy_rank_0.ckpt")
