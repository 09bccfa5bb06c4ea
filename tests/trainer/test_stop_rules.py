"""The rules of graceful exit and exception_save without a training run: SIGTERM and
OnRequestExit's config_file set the stop request; OnRequestExit keys without effect warn by
name; exception_save refuses to save a half-updated step, a multi-rank run or step 0."""
import json
import logging
import os
import signal
from types import SimpleNamespace

import pytest

from mindformers_st.config import load_config
from mindformers_st.errors import ConfigError
from mindformers_st.trainer.stop import GracefulExit, exception_save


def _with_on_request_exit(tmp_path, **keys):
    lines = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in keys.items())
    path = tmp_path / "run.yaml"
    path.write_text("callbacks:\n  - type: MFLossMonitor\n  - type: CheckpointMonitor\n"
                    "  - type: OnRequestExit\n" + lines)
    return str(path)


def test_sigterm_sets_the_request_only_while_active_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulExit(True, None) as g:
        assert not g.stop_now()
        os.kill(os.getpid(), signal.SIGTERM)
        assert g.stop_now()
    assert signal.getsignal(signal.SIGTERM) is before
    with GracefulExit(False, None) as off:   # disabled: no handler, never stops
        assert signal.getsignal(signal.SIGTERM) is before and not off.stop_now()


def test_on_request_exit_config_file_asks_for_a_stop(tmp_path):
    request = tmp_path / "graceful_exit.json"
    cfg = load_config(_with_on_request_exit(tmp_path, config_file=str(request), save_mindir=False),
                      [("use_graceful_exit", "True")])
    with GracefulExit.of_config(cfg, None) as g:
        assert g.save and g.config_file == str(request)
        assert not g.stop_now()                      # no file yet
        request.write_text('{"GracefulExit": 0}')
        assert not g.stop_now()
        request.write_text('{"GracefulExit": 1}')
        assert g.stop_now()
    cfg = load_config(_with_on_request_exit(tmp_path, save_ckpt=False),
                      [("use_graceful_exit", "True")])
    with GracefulExit.of_config(cfg, None) as g:     # save_ckpt False: stop without a save
        assert g.enabled and not g.save


def test_on_request_exit_keys_without_effect_warn_and_it_needs_use_graceful_exit(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(_with_on_request_exit(tmp_path, save_mindir=True, directory="./grace/"))
    assert "'callbacks.2.save_mindir' = True has no effect here" in caplog.text
    assert "'callbacks.2.directory' = './grace/' has no effect here" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not GracefulExit.of_config(cfg, None).enabled
    assert "OnRequestExit has no effect without use_graceful_exit" in caplog.text
    with pytest.raises(ConfigError, match="sig"):
        load_config(_with_on_request_exit(tmp_path, sig=2))


class _Monitor:
    exception_save = True

    def __init__(self):
        self.saved = 0

    def save_unsaved_step(self, run_context):
        self.saved += 1
        return True


def _state(step=3, updating=False, world=1):
    return SimpleNamespace(global_step=step, train_step=SimpleNamespace(updating=updating),
                           ctx=SimpleNamespace(world_size=world, is_main=True))


@pytest.mark.parametrize("state, why", [(_state(updating=True), "changing the weights"),
                                        (_state(world=2), "2 ranks"),
                                        (_state(step=0), "no step was completed")])
def test_exception_save_saves_nothing_it_cannot_trust(state, why, caplog):
    monitor = _Monitor()
    with caplog.at_level(logging.WARNING):
        assert exception_save([monitor], None, state, RuntimeError("x")) is None
    assert monitor.saved == 0 and why in caplog.text


def test_exception_save_saves_the_last_completed_step():
    monitor = _Monitor()
    assert exception_save([monitor], None, _state(step=3), RuntimeError("x")) == 3
    assert monitor.saved == 1
    off = _Monitor()
    off.exception_save = False
    assert exception_save([off], None, _state(step=3), RuntimeError("x")) is None and off.saved == 0
