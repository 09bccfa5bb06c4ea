"""Data tools: tokenizer training, pretrain packing, Alpaca masking, MindRecord, per-rank order."""
import json
import os

import numpy as np
import pytest

from mindformers_st.data.builders import IGNORE_INDEX, alpaca_prompt, build_finetune, pack_pretrain
from mindformers_st.data.mindrecord import BatchPlan, rank_indices
from mindformers_st.data.tiny_corpus import ALPACA_FILE, CORPUS_FILE, generate_corpus
from mindformers_st.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from mindformers_st.errors import ConfigError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe_tokenizer([CORPUS_FILE], 400, str(path))
    return load_tokenizer(str(path))


def test_shipped_assets_are_small_and_reproducible():
    assert os.path.getsize(CORPUS_FILE) + os.path.getsize(ALPACA_FILE) < 1_000_000
    with open(CORPUS_FILE, encoding="utf-8") as fh:
        assert fh.read() == generate_corpus(seed=0)


def test_tokenizer_has_llama_special_ids_and_round_trips(tok):
    assert [tok.token_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    ids = tok.encode("I love Beijing, because the food there is good.")
    assert ids[0] == 1 and tok.vocab_size == 400
    assert tok.decode(ids) == "I love Beijing, because the food there is good."


def test_pretrain_rows_are_the_eos_separated_stream(tok):
    docs = ["The red fox lives near the river.", "Two plus three is five."] * 20
    rows = pack_pretrain(docs, tok, seq_length=15)
    stream = []
    for d in docs:
        stream += tok.encode(d) + [2]
    assert rows.shape == (len(stream) // 16, 16) and rows.dtype == np.int32
    assert rows.reshape(-1).tolist() == stream[:rows.size]
    with pytest.raises(ConfigError, match="fewer than one row"):
        pack_pretrain(["hi"], tok, seq_length=500)


def test_finetune_labels_mask_prompt_and_padding(tok):
    rec = {"instruction": "What does the fox eat?", "input": "", "output": "The fox eats honey."}
    cols = build_finetune([rec], tok, seq_length=127)
    ids, labels = cols["input_ids"][0].tolist(), cols["labels"][0].tolist()
    prompt = tok.encode(alpaca_prompt(rec))
    answer = tok.encode(rec["output"], add_special_tokens=False) + [2]
    assert ids[:len(prompt) + len(answer)] == prompt + answer
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):len(prompt) + len(answer)] == answer
    assert set(labels[len(prompt) + len(answer):]) == {IGNORE_INDEX}
    assert set(ids[len(prompt) + len(answer):]) == {0}


def test_dp_ranks_read_disjoint_rows_of_each_global_batch():
    plan = BatchPlan(num_samples=50, batch_size=3, data_parallel=2)
    assert plan.steps_per_epoch == 8
    r0, r1 = (rank_indices(plan, 0, d, seed=7, shuffle=True) for d in (0, 1))
    assert len(r0) == len(r1) == 24 and not set(r0) & set(r1)
    order = np.random.default_rng([7, 0]).permutation(50)
    assert r0[:3].tolist() == order[:3].tolist() and r1[:3].tolist() == order[3:6].tolist()
    # deterministic, epoch-dependent, and resumable at a step
    assert rank_indices(plan, 0, 0, 7, True).tolist() == r0.tolist()
    assert rank_indices(plan, 1, 0, 7, True).tolist() != r0.tolist()
    assert rank_indices(plan, 0, 0, 7, True, start_step=5).tolist() == r0[15:].tolist()


def test_cli_builds_mindrecord_files(tmp_path):
    from mindformers_st.data.__main__ import main
    from mindformers_st.data.mindrecord import read_all

    tok_path = str(tmp_path / "tokenizer.json")
    assert main(["train-tokenizer", "--input", CORPUS_FILE, "--vocab_size", "400",
                 "--output", tok_path]) == 0
    wiki = str(tmp_path / "wiki.mindrecord")
    assert main(["pretrain", "--input", CORPUS_FILE, "--tokenizer", tok_path,
                 "--seq_length", "32", "--output", wiki]) == 0
    rows = read_all(wiki, ["input_ids"])["input_ids"]
    assert rows.shape[1] == 33 and rows.shape[0] > 1000
    small = tmp_path / "alpaca.json"
    small.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 3))
    alp = str(tmp_path / "alpaca.mindrecord")
    assert main(["finetune", "--input", str(small), "--tokenizer", tok_path,
                 "--seq_length", "63", "--output", alp]) == 0
    cols = read_all(alp, ["input_ids", "labels"])
    assert cols["labels"].shape == (3, 64) and (cols["labels"] == IGNORE_INDEX).any()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"output": "x"}]))
    assert main(["finetune", "--input", str(bad), "--tokenizer", tok_path, "--seq_length", "8",
                 "--output", str(tmp_path / "b.mindrecord")]) == 1
