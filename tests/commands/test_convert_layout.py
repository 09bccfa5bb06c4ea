"""`mindformers-st convert-layout`: legacy (complete or rank_x/) -> Checkpoint 2.0 -> legacy,
tensors and counters identical; distributed blocks kept as they are with metadata.json."""
import json
import os

import numpy as np

from mindformers_st.checkpoint.loader import LoadOptions, load_checkpoint
from mindformers_st.cli import main
from mindformers_st.layout.parallel_config import ParallelConfig
from mindformers_st.records.iteration import read_common, read_metadata
from mindformers_st.storage.writer import load_tensors
from mindformers_st.transform.sources import describe_source
from tests.checkpoint.test_loader import (assert_weights, global_values, make_ctx, make_model,
                                          tiny_cfg, write_complete, write_distributed)

HYPER = {"global_step": np.array([6], np.int32), "epoch_num": np.array([1], np.int64),
         "step_num": np.array([2], np.int64), "loss_scale": np.array([1024.0], np.float32)}


def _complete(folder):
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            out.update(load_tensors(os.path.join(folder, f)))
    return out


def test_complete_weights_go_to_checkpoint_2_and_back(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    src = write_complete(tmp_path / "legacy", values, HYPER)
    assert main(["convert-layout", str(src), str(tmp_path / "v2"), "--no-progress"]) == 0
    it = tmp_path / "v2" / "iteration_00000006"
    assert sorted(os.listdir(it)) == ["common.json", "model-0000000-0000001.safetensors",
                                      "opt-0000000-0000001.safetensors"]
    assert (tmp_path / "v2" / "latest_checkpointed_iteration.txt").read_text() == "6"
    common = read_common(str(it))
    assert (common.epoch_num, common.step_num, common.global_step, common.loss_scale) == \
        (1, 2, 6, 1024.0)
    opt = load_tensors(str(it / "opt-0000000-0000001.safetensors"))
    assert sorted(opt) == sorted([n for n in values if n.startswith("adam_")] + ["global_step"])
    model = load_tensors(str(it / "model-0000000-0000001.safetensors"))
    assert sorted(model) == sorted(n for n in values if not n.startswith("adam_"))

    assert main(["convert-layout", str(tmp_path / "v2"), str(tmp_path / "back"),
                 "--no-progress"]) == 0
    back = _complete(tmp_path / "back")
    for n, v in {**values, **HYPER}.items():
        np.testing.assert_array_equal(back[n], v, err_msg=n)


def test_rank_files_keep_their_blocks_with_metadata_and_load_as_the_same_layout(tmp_path):
    cfg = tiny_cfg()
    values = global_values(cfg)
    pc = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
    src = write_distributed(tmp_path / "ckpt", cfg, values, pc)
    assert main(["convert-layout", str(src), str(tmp_path / "v2"), "--iteration", "3",
                 "--no-progress"]) == 0
    it = tmp_path / "v2" / "iteration_00000003"
    assert "model-0000001-0000002.safetensors" in os.listdir(it)
    meta = read_metadata(str(it))
    wq = meta.tensors["model.layers.0.attention.wq.weight"]
    assert [c.slice.offsets for c in wq.chunks] == [(0, 0), (cfg.hidden_size // 2, 0)]
    raw = json.loads((it / "metadata.json").read_text())
    assert raw["storage_data"]["('model.layers.0.attention.wq.weight', (8, 0))"][0]["file_name"] \
        == "model-0000001-0000002.safetensors"
    described = describe_source(str(tmp_path / "v2"))
    assert (described.kind, described.layout) == ("distributed", "iteration")
    for rank in (0, 1):   # the blocks are this layout's: loaded without re-cutting
        ctx = make_ctx(pc, rank)
        model = make_model(cfg, ctx)
        report = load_checkpoint(LoadOptions(str(tmp_path / "v2"), "safetensors",
                                             use_parallel=True, output_dir=str(tmp_path / "o")),
                                 model, None, ctx)
        assert report.mode == "same_layout"
        assert_weights(model, values, cfg, pc, rank)
    assert main(["merge", str(tmp_path / "v2"), str(tmp_path / "merged"), "--no-progress"]) == 0
    merged = _complete(tmp_path / "merged")
    for n, v in values.items():
        np.testing.assert_array_equal(merged[n], v, err_msg=n)
    assert int(merged["global_step"][0]) == 6


def test_a_source_without_global_step_needs_an_iteration(tmp_path, capsys):
    cfg = tiny_cfg()
    src = write_complete(tmp_path / "legacy", global_values(cfg, optimizer=False), hyper=None)
    assert main(["convert-layout", str(src), str(tmp_path / "v2")]) == 1
    assert "pass --iteration N" in capsys.readouterr().err
    assert not (tmp_path / "v2").exists()


def test_inspect_and_verify_read_checkpoint_2(tmp_path, capsys):
    cfg = tiny_cfg()
    values = global_values(cfg)
    pc = ParallelConfig(model_parallel=2, vocab_emb_dp=False)
    src = write_distributed(tmp_path / "ckpt", cfg, values, pc)
    assert main(["convert-layout", str(src), str(tmp_path / "v2"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "v2"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["kind"], summary["layout"], summary["step"]) == ("distributed", "iteration", 6)
    row = [r for r in summary["tensors"] if r["name"] == "model.layers.0.attention.wq.weight"
           and r["rank"] == 1][0]
    assert row["offsets"] == [cfg.hidden_size // 2, 0]
    assert main(["verify", str(tmp_path / "v2")]) == 0
    assert "OK: Checkpoint 2.0 checkpoint" in capsys.readouterr().out
    # a chunk lost from metadata.json leaves a hole verify names
    it = tmp_path / "v2" / "iteration_00000006"
    raw = json.loads((it / "metadata.json").read_text())
    name = "model.layers.0.attention.wq.weight"
    raw["state_dict_metadata"][name]["chunk"].pop()
    raw["storage_data"].pop(f"('{name}', (8, 0))")
    (it / "metadata.json").write_text(json.dumps(raw))
    assert main(["verify", str(tmp_path / "v2")]) == 1
    out = capsys.readouterr().out
    assert "is not described by metadata.json" in out or "is in no" in out


def test_reshard_and_export_hf_read_checkpoint_2(tmp_path):
    import yaml
    from tests.conftest import TINY_LLAMA
    cfg = tiny_cfg()
    values = global_values(cfg)
    src = write_distributed(tmp_path / "ckpt", cfg, values,
                            ParallelConfig(model_parallel=2, vocab_emb_dp=False))
    assert main(["convert-layout", str(src), str(tmp_path / "v2"), "--no-progress"]) == 0
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"model": {"model_config": dict(TINY_LLAMA)}}))
    assert main(["reshard", str(tmp_path / "v2"), str(tmp_path / "dp2"), "--config",
                 str(run_yaml), "--dp", "2", "--mp", "1", "--pp", "1", "--no-progress"]) == 0
    for r in (0, 1):   # data parallel: every rank holds every tensor whole
        held = load_tensors(str(tmp_path / "dp2" / f"rank_{r}" / f"checkpoint_rank_{r}.safetensors"))
        for n, v in values.items():
            np.testing.assert_array_equal(held[n], v, err_msg=n)
    assert main(["export-hf", str(tmp_path / "v2"), str(tmp_path / "hf"), "--config",
                 str(run_yaml), "--no-progress"]) == 0
    hf = _complete(tmp_path / "hf")
    np.testing.assert_array_equal(hf["model.embed_tokens.weight"],
                                  values["model.tok_embeddings.embedding_weight"])
    assert not any(n.startswith("adam_") for n in hf)
