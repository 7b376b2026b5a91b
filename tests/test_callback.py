"""on_epoch_end, train_model_advanced's one extension point: called once per epoch with the
history's own row; True stops after that epoch's checkpoint; any other answer than True, False
or None is a TypeError; an exception propagates after the checkpoint; a resume after a stop
continues as if the run had never stopped."""

import json
import re

import pytest
import torch

from _helpers import make_loaders, make_model
from advanced_training_utils import train_model_advanced
from advanced_training_utils.checkpoint import CONFIG_KEY, EPOCH_KEY, HISTORY_KEY, load_checkpoint
from advanced_training_utils.engine.config import TrainConfig

CE = torch.nn.CrossEntropyLoss()
OPTS = dict(learning_rate=3e-3, device="cpu", verbose=False, seed=0, model_name="m")


def _train(tmp_path, epochs, **kw):
    tl, vl = make_loaders(n=32, batch_size=16)
    return train_model_advanced(make_model(1), tl, vl, CE, checkpoint_dir=tmp_path,
                                epochs=epochs, **{**OPTS, **kw})


def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "m_metrics.jsonl").read_text().splitlines()]


def test_called_once_per_epoch_with_the_history_row(tmp_path):
    seen = []
    res = _train(tmp_path, 3, on_epoch_end=lambda row: seen.append((row, dict(row))))
    assert [copy for _, copy in seen] == res["history"]
    assert all(row is h for (row, _), h in zip(seen, res["history"]))  # the history's own dict
    assert res["epochs_run"] == 3 and res["stopped_by_callback"] is False
    assert all("stopped_by_callback" not in h for h in res["history"])


def test_true_stops_after_that_epoch_with_its_checkpoint_written(tmp_path):
    def stop_at_2(row):
        return row["epoch"] == 2

    res = _train(tmp_path, 5, on_epoch_end=stop_at_2, early_stop_patience=None)
    assert res["epochs_run"] == 2
    assert res["stopped_by_callback"] is True and res["stopped_early"] is False
    assert res["history"][-1]["stopped_by_callback"] is True
    assert "stopped_by_callback" not in res["history"][0]
    ck = load_checkpoint(tmp_path / "m_last.pt")
    assert ck[EPOCH_KEY] == 2
    assert ck[HISTORY_KEY] == res["history"]                     # the flag is in the checkpoint
    assert ck[CONFIG_KEY]["on_epoch_end"] == "stop_at_2"         # its name, never the callable
    assert _log(tmp_path)[-1]["stopped_by_callback"] is True     # and in the metrics log
    assert len(_log(tmp_path)) == 2


@pytest.mark.parametrize("answer", [1, 0, "stop", torch.tensor(True), [True]])
def test_an_answer_other_than_true_false_none_is_a_type_error(tmp_path, answer):
    said = re.escape(f"it returned {answer!r} ({type(answer).__name__})")
    with pytest.raises(TypeError, match=r"on_epoch_end must return True \(stop\), False or None "
                                        r"\(go on\); " + said):
        _train(tmp_path, 3, on_epoch_end=lambda row: answer)
    assert load_checkpoint(tmp_path / "m_last.pt")[EPOCH_KEY] == 1  # written before it propagated


def test_false_and_none_go_on(tmp_path):
    res = _train(tmp_path, 2, on_epoch_end=lambda row: row["epoch"] == 99)  # False every epoch
    assert res["epochs_run"] == 2 and res["stopped_by_callback"] is False


@pytest.mark.parametrize("bad", [3, "stop", True])
def test_a_non_callable_option_is_refused_before_any_work(bad):
    with pytest.raises(TypeError, match=rf"on_epoch_end must be a callable .*got {bad!r}"):
        TrainConfig.from_options(on_epoch_end=bad)


class Boom(Exception):
    pass


def test_an_exception_in_the_callback_propagates_after_the_epochs_checkpoint(tmp_path):
    def explode_at_2(row):
        if row["epoch"] == 2:
            raise Boom("from the callback")

    with pytest.raises(Boom, match="from the callback"):
        _train(tmp_path, 4, on_epoch_end=explode_at_2)
    assert load_checkpoint(tmp_path / "m_last.pt")[EPOCH_KEY] == 2
    assert [r["epoch"] for r in _log(tmp_path)] == [1, 2]


def test_resume_after_a_callback_stop_equals_the_uninterrupted_run(tmp_path):
    whole = _train(tmp_path / "whole", 4, restore_best_weights=False)
    m_whole = _last_weights(tmp_path / "whole")
    stopped = _train(tmp_path / "run", 4, restore_best_weights=False,
                     on_epoch_end=lambda row: row["epoch"] == 2)
    assert stopped["epochs_run"] == 2
    res = _train(tmp_path / "run", 4, restore_best_weights=False, resume=True)
    assert res["epochs_run"] == 4 and res["stopped_by_callback"] is False
    assert res["history"][1]["stopped_by_callback"] is True  # the stop stays on record
    assert [h["train_loss"] for h in res["history"]] == [h["train_loss"]
                                                         for h in whole["history"]]
    m_res = _last_weights(tmp_path / "run")
    assert all(torch.equal(m_res[k], m_whole[k]) for k in m_whole)


def _last_weights(folder):
    return load_checkpoint(folder / "m_last.pt")["model"]
