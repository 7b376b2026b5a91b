"""app/tasks.py: the built-in tasks' data, models, defaults and test evaluations."""

import pytest
import torch

from advanced_training_utils.app.tasks import (
    TASK_OPTIONS,
    TASK_TRAIN_DEFAULTS,
    TASKS,
    build_task,
)
from advanced_training_utils.engine.config import AUGMENT_MODALITIES, TrainConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def notes():
    return build_task("notes", 0, {"batch_size": 16})


@pytest.fixture(scope="module")
def emotion():
    return build_task("emotion", 0, {"per_piece": 1})


def test_every_task_has_options_and_valid_training_defaults():
    assert TASKS == ("emotion", "emotion-easy", "notes") == tuple(TASK_TRAIN_DEFAULTS)
    for name in TASKS:
        cfg = TrainConfig.from_options(**TASK_TRAIN_DEFAULTS[name])  # valid train options
        assert cfg.augment in AUGMENT_MODALITIES  # a modality is named, never guessed
        assert "batch_size" in TASK_OPTIONS[name]


@pytest.mark.parametrize("fixture, n_inputs", [("notes", 3), ("emotion", None)])
def test_splits_are_disjoint_and_counted_in_info(request, fixture, n_inputs):
    task = request.getfixturevalue(fixture)
    sizes = [len(loader.dataset) for loader in
             (task.train_loader, task.val_loader, task.test_loader)]
    assert sizes == [task.info["train_examples"], task.info["val_examples"],
                     task.info["test_examples"]]
    assert all(s > 0 for s in sizes)
    if n_inputs is not None:
        assert task.train_loader.dataset.tensors[0].shape[1] == n_inputs


def test_the_options_reach_the_loaders(notes):
    assert notes.train_loader.batch_size == 16  # the option, not the default 64


def test_the_seed_fixes_the_model_initialisation():
    a, b = build_task("notes", 3, {}), build_task("notes", 3, {})
    c = build_task("notes", 4, {})
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.model.parameters(), c.model.parameters()))


def test_notes_evaluation_against_a_hand_computed_baseline(notes):
    r = notes.evaluate_test(notes.model, CPU)
    x, y = notes.test_loader.dataset.tensors
    probs = torch.sigmoid(notes.model(x))
    bce = torch.nn.functional.binary_cross_entropy
    mean = notes.train_loader.dataset.tensors[1].mean(0).clamp(1e-6, 1 - 1e-6)
    assert r["test_examples"] == len(y)
    assert r["test_bce"] == pytest.approx(float(bce(probs.detach(), y)), rel=1e-6)
    assert r["mean_baseline_bce"] == pytest.approx(float(bce(mean.expand_as(y), y)), rel=1e-6)
    assert set(r["scale_degree_probe"]) == {"major", "minor"}


def test_emotion_evaluation_counts_agree(emotion):
    r = emotion.evaluate_test(emotion.model, CPU)
    confusion = torch.tensor(r["confusion"])
    _, y = emotion.test_loader.dataset.tensors
    assert int(confusion.sum()) == r["test_examples"] == len(y)
    assert r["test_accuracy"] == pytest.approx(int(confusion.trace()) / len(y))
    assert confusion.sum(1).tolist() == torch.bincount(y, minlength=4).tolist()  # rows: truth
    assert r["majority_baseline_accuracy"] == pytest.approx(
        int(torch.bincount(y, minlength=4).max()) / len(y))
    assert r["classes"] == ["happy", "calm", "sad", "tense"]


def test_emotion_is_the_varied_variant_and_emotion_easy_the_old_one(emotion):
    easy = build_task("emotion-easy", 0, {"per_piece": 1})
    assert (emotion.name, emotion.info["variant"]) == ("emotion", "varied")
    assert (easy.name, easy.info["variant"]) == ("emotion-easy", "easy")
    for a, b in ((emotion.test_loader, easy.test_loader), (emotion.val_loader, easy.val_loader)):
        xa, ya = a.dataset.tensors
        xb, yb = b.dataset.tensors
        assert torch.equal(ya, yb) and not torch.equal(xa, xb)  # same clips, other sounds
    assert TASK_OPTIONS["emotion"] == TASK_OPTIONS["emotion-easy"]
    assert TASK_TRAIN_DEFAULTS["emotion"] == TASK_TRAIN_DEFAULTS["emotion-easy"]


def test_train_fraction_subsets_training_only(emotion):
    small = build_task("emotion", 0, {"per_piece": 1, "train_fraction": 0.3})
    n_full, n_small = emotion.info["train_examples"], small.info["train_examples"]
    assert len(small.train_loader.dataset) == n_small and 0.2 * n_full < n_small < 0.4 * n_full
    assert small.info["train_fraction"] == 0.3 and emotion.info["train_fraction"] == 1.0
    for a, b in ((small.val_loader, emotion.val_loader), (small.test_loader, emotion.test_loader)):
        assert all(torch.equal(x, y) for x, y in zip(a.dataset.tensors, b.dataset.tensors))
    full_x = emotion.train_loader.dataset.tensors[0].flatten(1)
    small_x = small.train_loader.dataset.tensors[0].flatten(1)
    rows = {tuple(r[:8].tolist()) for r in full_x}
    assert all(tuple(r[:8].tolist()) in rows for r in small_x)  # a subset of the full split
