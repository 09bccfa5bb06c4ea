"""CheckpointMonitor and load_checkpoint as MindSpore components: `Model.train(callbacks=[...])`
with a plain nn.Cell and MindSpore's optimizers, compared with MindSpore's own ModelCheckpoint
(same run, both callbacks), MindSpore's loaders, and a resume that continues bit for bit."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mindformers_st import CheckpointMonitor, load_checkpoint
from mindformers_st.records.commit import load_committed_entries
from mindformers_st.records.hyper import SAVE_HYPER_DTYPES
from mindformers_st.storage.checksum import verify_checksums
from mindformers_st.storage.reader import open_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "model_train_checkpoint.py")
LOSS = re.compile(r"^step (\d+) loss ([0-9.]+)$", re.M)


def _net_and_data():
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import nn

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(3)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Dense(6, 8)
            self.fc2 = nn.Dense(8, 3)

        def construct(self, x):
            return self.fc2(self.fc1(x))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 6)).astype(np.float32)
    y = rng.integers(0, 3, 24).astype(np.int32)
    return Net(), ds.NumpySlicesDataset({"x": x, "y": y}, shuffle=False).batch(4)


OPTIMIZERS = {
    "AdamWeightDecay": lambda nn, p: nn.AdamWeightDecay(p, 1e-3),
    "Adam": lambda nn, p: nn.Adam(p, 1e-3),
    "Momentum": lambda nn, p: nn.Momentum(p, 1e-2, 0.9),
    "SGD": lambda nn, p: nn.SGD(p, 1e-2, momentum=0.9),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_same_run_same_tensors_as_mindspore_model_checkpoint(tmp_path, opt_name):
    import mindspore as ms
    from mindspore import nn
    from mindspore.train import CheckpointConfig, Model, ModelCheckpoint

    net, data = _net_and_data()
    opt = OPTIMIZERS[opt_name](nn, net.trainable_params())
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt)
    ours = CheckpointMonitor(prefix="net", checkpoint_format="safetensors", save_checkpoint_steps=3,
                             output_dir=str(tmp_path))
    theirs = ModelCheckpoint(prefix="net", directory=str(tmp_path / "ms"),
                             config=CheckpointConfig(save_checkpoint_steps=3, format="safetensors"))
    model.train(2, data, callbacks=[ours, theirs], dataset_sink_mode=False)

    entries = load_committed_entries(str(tmp_path / "checkpoint"))
    assert [(e.epoch, e.step, e.global_step) for e in entries] == [
        (1, 3, 3), (1, 6, 6), (2, 3, 9), (2, 6, 12)]
    mine = entries[-1].path(0)
    with open_safetensors(mine) as f, open_safetensors(str(tmp_path / "ms" / "net-2_6.safetensors")) as g:
        assert set(g.tensors) <= set(f.tensors)
        for name in g.tensors:
            np.testing.assert_array_equal(f.read(name), g.read(name), err_msg=name)
            assert f.tensors[name].dtype == g.tensors[name].dtype, name
        # ours adds exactly the resume values (a network tensor of the same name wins)
        assert set(f.tensors) - set(g.tensors) == set(SAVE_HYPER_DTYPES) - set(g.tensors)
        assert verify_checksums(f) == [] and "mindformers_st" in f.metadata
    # MindSpore's own loader takes our file as it is
    fresh, _ = _net_and_data()
    params = ms.load_checkpoint(mine, format="safetensors")
    not_loaded, _ = ms.load_param_into_net(fresh, params)
    assert not_loaded == []
    np.testing.assert_array_equal(fresh.fc2.weight.asnumpy(), net.fc2.weight.asnumpy())
    assert os.path.isfile(tmp_path / "strategy" / "ckpt_strategy_rank_0.ckpt")


def test_a_run_saving_into_a_folder_of_another_prefix_warns(tmp_path, caplog):
    from mindspore import nn
    from mindspore.train import Model

    for prefix in ("net", "other"):
        net, data = _net_and_data()
        model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"),
                      nn.Momentum(net.trainable_params(), 0.01, 0.9))
        model.train(1, data, callbacks=[CheckpointMonitor(
            prefix=prefix, checkpoint_format="safetensors", save_checkpoint_steps=6,
            output_dir=str(tmp_path))], dataset_sink_mode=False)
        assert ("already holds saves of another run (net 1_6)" in caplog.text) == (prefix == "other")


def test_load_checkpoint_into_any_network_and_resume_its_optimizer(tmp_path, capsys):
    from mindspore import nn
    from mindspore.train import Model

    net, data = _net_and_data()
    opt = nn.AdamWeightDecay(net.trainable_params(), 1e-3)
    model = Model(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"), opt)
    model.train(2, data, callbacks=[CheckpointMonitor(
        prefix="net", checkpoint_format="safetensors", save_checkpoint_steps=6,
        output_dir=str(tmp_path))], dataset_sink_mode=False)
    # weights only, into a fresh network
    fresh, _ = _net_and_data()
    report = load_checkpoint(fresh, str(tmp_path / "checkpoint"), output_dir=str(tmp_path / "o"))
    assert report.mode == "same_layout" and not report.missing
    assert "adam_m.fc1.weight" in report.optimizer_ignored
    np.testing.assert_array_equal(fresh.fc1.weight.asnumpy(), net.fc1.weight.asnumpy())
    # resume: the optimizer's moments and step come back too, and the report says where to go on
    fresh2, _ = _net_and_data()
    opt2 = nn.AdamWeightDecay(fresh2.trainable_params(), 1e-3)
    report = load_checkpoint(fresh2, str(tmp_path / "checkpoint"), optimizer=opt2, resume=True,
                             steps_per_epoch=6, output_dir=str(tmp_path / "o"))
    assert report.optimizer_loaded and report.resume.global_step == 12
    assert (report.resume_point.initial_epoch, report.resume_point.skip_steps) == (2, 0)
    def moment(o):
        return next(p for p in o.get_parameters() if p.name == "adam_m.fc1.weight").asnumpy()
    np.testing.assert_array_equal(moment(opt2), moment(opt))
    assert "initial_epoch=2" in capsys.readouterr().out
    # a network that does not match is refused by name
    other = nn.Dense(6, 5)
    with pytest.raises(Exception, match="weight"):
        load_checkpoint(other, str(tmp_path / "checkpoint"), output_dir=str(tmp_path / "o"))


def _run_example(out, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3")
    proc = subprocess.run([sys.executable, EXAMPLE, "--output_dir", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {int(s): v for s, v in LOSS.findall(proc.stdout)}, proc.stdout


@pytest.mark.slow
def test_example_resume_continues_the_same_losses_bit_for_bit(tmp_path):
    straight, _ = _run_example(tmp_path / "a", "--epochs", "3")
    first, _ = _run_example(tmp_path / "b", "--epochs", "2")
    resumed, out = _run_example(tmp_path / "b", "--epochs", "3", "--resume")
    assert "initial_epoch=2" in out
    assert list(resumed) == list(range(1, 17))   # Model.train counts the resumed epoch from 1
    assert [resumed[s] for s in range(1, 17)] == [straight[s] for s in range(33, 49)]
    entries = load_committed_entries(str(tmp_path / "b" / "checkpoint"))
    assert [e.global_step for e in entries] == [16, 32, 48]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--graph", "--sink"], ["--loss_scale", "--async_save"],
                                   ["--optimizer", "Momentum", "--graph"]])
def test_example_in_graph_mode_with_sink_loss_scale_and_async(tmp_path, flags):
    losses, _ = _run_example(tmp_path, "--epochs", "2", *flags)
    entries = load_committed_entries(str(tmp_path / "checkpoint"))
    assert [e.global_step for e in entries] == [16, 32]
    with open_safetensors(entries[-1].path(0)) as f:
        assert verify_checksums(f) == []
        scale = float(f.read("loss_scale").reshape(-1)[0])
        assert scale == (1024.0 if "--loss_scale" in flags else 1.0)
        assert int(f.read("global_step").reshape(-1)[0]) == 32


def test_layouts_from_parameter_layout_dict_as_mindspore_builds_it():
    """Semi-auto parallel runs only on Ascend/GPU: the entries are built here as MindSpore's
    mindspore.parallel._tensor builds them (dev_matrix, tensor_map, slice_shape, field size,
    uniform split, opt shard group, full shape, after-reshape slice shape)."""
    from mindspore import nn
    from mindformers_st.checkpoint.network import CellState, layouts_from_parameter_layout_dict
    from mindformers_st.errors import LayoutError

    # fc1.weight (8, 4): rows split over 2 devices (tensor_map 0 -> the last dev_matrix axis)
    entries = {"fc1.weight": [[2], [0, -1], [4, 4], 0, True, "", [8, 4], []],
               "fc1.bias": [[2], [-1], [8], 0, True, "", [8], []]}
    lays = layouts_from_parameter_layout_dict(entries, {"fc1.weight": (4, 4), "fc1.bias": (8,)})
    assert lays["fc1.weight"].slice_for(1).offsets == (4, 0)
    assert lays["fc1.weight"].slice_for(1).sizes == (4, 4)
    assert lays["fc1.bias"].slice_for(1).sizes == (8,)
    # without full_shape the slice shape times the split gives it
    lays = layouts_from_parameter_layout_dict({"w": [[2, 2], [1, 0], [2, 3], 0, True, ""]},
                                              {"w": (2, 3)})
    assert lays["w"].global_shape == (4, 6)
    with pytest.raises(LayoutError, match="not uniform"):
        layouts_from_parameter_layout_dict({"w": [[2], [0], [2], 0, False, ""]}, {"w": (2,)})
    with pytest.raises(LayoutError, match="strategy file"):
        layouts_from_parameter_layout_dict({"w": [[2], [-1], [4], 0, True, "g0"]}, {"w": (4,)})

    net = nn.Dense(4, 8)
    net.parameter_layout_dict = {"weight": [[2], [0, -1], [4, 4], 0, True, "", [8, 4], []]}
    state = CellState(net, None, world=2)
    assert state.layouts["weight"].global_shape == (8, 4)
    assert state.layouts["bias"].dev_matrix == (2,)          # not in the dict: replicated
