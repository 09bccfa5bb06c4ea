"""The Checkpoint 2.0 records (records/iteration.py): names, tracker, common.json and
metadata.json, each checked when read."""
import json

import pytest

from mindformers_st.errors import CheckpointError
from mindformers_st.layout.slices import TensorSlice
from mindformers_st.records.iteration import (CommonInfo, IterationMetadata, build_metadata,
                                              find_iteration, iteration_dir_name,
                                              parse_iteration_dir, parse_shard_file,
                                              read_common, read_metadata, read_tracker,
                                              shard_file_name, shard_id, write_common,
                                              write_metadata, write_tracker)


def test_names_round_trip_as_mindformers_spells_them():
    assert iteration_dir_name(6) == "iteration_00000006"
    assert parse_iteration_dir("/x/iteration_00000006/") == 6
    assert parse_iteration_dir("iteration_6x") is None
    assert shard_file_name("model", 1, 2) == "model-0000001-0000002.safetensors"
    assert shard_file_name("opt", 0, 1, "llama") == "llama-opt-0000000-0000001.safetensors"
    parsed = parse_shard_file("llama-opt-0000000-0000001.safetensors")
    assert (parsed.kind, parsed.rank, parsed.world, parsed.prefix) == ("opt", 0, 1, "llama")
    assert parse_shard_file("model-00001-of-00002.safetensors") is None
    with pytest.raises(CheckpointError, match="outside world size"):
        shard_file_name("model", 2, 2)
    assert shard_id("w", (0, 8)) == "('w', (0, 8))"


def test_tracker_names_an_existing_iteration(tmp_path):
    assert read_tracker(str(tmp_path)) is None
    (tmp_path / "iteration_00000004").mkdir()
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        find_iteration(str(tmp_path))
    write_tracker(str(tmp_path), 4)
    it = find_iteration(str(tmp_path))
    assert (it.iteration, it.how) == (4, "tracker")
    assert find_iteration(str(tmp_path / "iteration_00000004")).how == "named"
    write_tracker(str(tmp_path), 9)
    with pytest.raises(CheckpointError, match="iteration_00000009/ is missing"):
        read_tracker(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("nine")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        read_tracker(str(tmp_path))


def test_common_json_has_exactly_mindformers_keys(tmp_path):
    info = CommonInfo(epoch_num=1, step_num=2, global_step=6, loss_scale=1.0, global_batch_size=4)
    write_common(str(tmp_path), info)
    obj = json.loads((tmp_path / "common.json").read_text())
    assert sorted(obj) == sorted(["epoch_num", "step_num", "global_step", "loss_scale",
                                  "global_batch_size", "ckpt_status"])
    assert read_common(str(tmp_path)) == info
    assert info.hyper_values() == {"epoch_num": 1, "step_num": 2, "global_step": 6,
                                   "loss_scale": 1.0, "global_batch_size": 4}
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['seed'\]"):
        CommonInfo.from_json({"seed": 1})
    with pytest.raises(CheckpointError, match="step_num is '2'"):
        CommonInfo.from_json({"step_num": "2"})
    (tmp_path / "common.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_common(str(tmp_path))


def _meta():
    whole = TensorSlice.whole((4, 2))
    halves = [TensorSlice((4, 2), (0, 0), (2, 2)), TensorSlice((4, 2), (2, 0), (2, 2))]
    return build_metadata({"a": [(halves[0], "model-0000000-0000002.safetensors", 0),
                                 (halves[1], "model-0000001-0000002.safetensors", 1)],
                           "b": [(whole, "model-0000000-0000002.safetensors", 0),
                                 (whole, "model-0000001-0000002.safetensors", 1)]},
                          {"a": "F32", "b": "BF16"})


def test_metadata_round_trips_into_slices(tmp_path):
    meta = _meta()
    write_metadata(str(tmp_path), meta)
    back = read_metadata(str(tmp_path))
    assert back == meta
    assert [c.slice.offsets for c in back.tensors["a"].chunks] == [(0, 0), (2, 0)]
    assert back.tensors["b"].chunks[0].files == ("model-0000000-0000002.safetensors",
                                                 "model-0000001-0000002.safetensors")
    raw = json.loads(meta.to_json())
    assert raw["state_dict_metadata"]["b"]["properties"]["dtype"] == "BFloat16"
    assert "('a', (2, 0))" in raw["storage_data"]


@pytest.mark.parametrize("edit, message", [
    (lambda o: o["storage_data"].pop("('a', (2, 0))"), "is in no file"),
    (lambda o: o["state_dict_metadata"]["a"]["chunk"][1].update(local_shape=[3, 2]),
     "does not fit global shape"),
    (lambda o: o["state_dict_metadata"]["a"]["properties"].update(dtype="Complex64"),
     "dtype 'Complex64'"),
    (lambda o: o["storage_data"].update({"('zz', (0,))": [{"file_name": "x"}]}),
     "no tensor has"),
    (lambda o: o["storage_data"].update({"not a key": [{"file_name": "x"}]}),
     "is not \\('name', \\(offsets\\)\\)"),
])
def test_metadata_problems_are_named(edit, message):
    obj = json.loads(_meta().to_json())
    edit(obj)
    with pytest.raises(CheckpointError, match=message):
        IterationMetadata.from_json(obj, "metadata.json")


def test_a_folder_of_both_layouts_is_refused_by_every_reader(tmp_path):
    from mindformers_st.checkpoint.detect import detect_checkpoint
    from mindformers_st.transform.sources import describe_source
    (tmp_path / "rank_0").mkdir()
    (tmp_path / "iteration_00000002").mkdir()
    write_tracker(str(tmp_path), 2)
    for read in (lambda: detect_checkpoint(str(tmp_path), "safetensors"),
                 lambda: describe_source(str(tmp_path))):
        with pytest.raises(CheckpointError, match="holds both rank_x/ folders"):
            read()
