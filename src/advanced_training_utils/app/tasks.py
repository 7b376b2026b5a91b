"""The built-in tasks: data, model, loss and held-out evaluation for ``advtrain train``.

* ``emotion`` (the default): 4-class emotion (happy / calm / sad / tense) from rendered Bach
  chorale clips, each piece in its own key, with a timbre, reverb and noise drawn per clip
  (``emotion_dataset(variant="varied")``). Its option ``train_fraction`` (in (0, 1], default 1)
  trains on a seeded subset of the training melodies (e.g. 0.1, 0.3): smaller fractions' subsets
  lie inside larger ones' for a seed; validation and test are untouched.
* ``emotion-easy``: the same clips transposed to C with one timbre (``variant="easy"``): valence
  and arousal can be read off fixed pitch bands and the note rate, so it reaches ~0.99.
* ``notes``: emotion embedding -> note probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from .data import EMOTION_CLASSES, emotion_dataset, notes_dataset, training_subset
from .evaluation import classification_test
from .models import EmotionRecognizer, NoteGenerator

__all__ = ["TASKS", "TASK_OPTIONS", "TASK_TRAIN_DEFAULTS", "EMOTION_TASKS", "Task",
           "build_task"]

#: Options of the task itself (not of train_model_advanced), with their defaults.
#: ``batch_size: auto`` and ``memory_budget``: see :mod:`.batchsize`.
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "emotion": {"batch_size": 32, "per_piece": 5, "train_fraction": 1.0, "memory_budget": None},
    "emotion-easy": {"batch_size": 32, "per_piece": 5, "train_fraction": 1.0,
                     "memory_budget": None},
    "notes": {"batch_size": 64, "memory_budget": None},
}

#: The emotion tasks and their data variant (``emotion_dataset(variant=...)``).
EMOTION_TASKS = {"emotion": "varied", "emotion-easy": "easy"}

#: Training defaults per task (a preset, a config file and --set override them). ``augment``
#: names each task's input modality (mels; emotion embeddings): it is used when a preset turns
#: ``use_augmentation`` on, since a modality is never guessed from the input shape.
TASK_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "emotion": {"epochs": 20, "learning_rate": 3e-3, "metrics": "accuracy", "augment": "audio"},
    "emotion-easy": {"epochs": 20, "learning_rate": 3e-3, "metrics": "accuracy",
                     "augment": "audio"},
    "notes": {"epochs": 30, "learning_rate": 2e-3, "augment": "emotion"},
}

#: The built-in tasks (``--task``); ``--data`` builds a task over the user's audio instead
#: (:mod:`.usertask`).
TASKS = tuple(TASK_OPTIONS)


@dataclass
class Task:
    """Everything ``advtrain train`` needs for one task."""

    name: str
    model: torch.nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None
    criterion: Callable[..., torch.Tensor]
    #: ``evaluate_test(model, device, out_dir=None)``: the held-out entries of summary.json;
    #: with ``out_dir`` (the run directory) it may also write the report's files there.
    evaluate_test: Callable[..., dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def _loaders(tensors: list[torch.Tensor], split: torch.Tensor, batch_size: int
             ) -> tuple[DataLoader, DataLoader, DataLoader]:
    def part(s: int) -> TensorDataset:
        m = split == s
        return TensorDataset(*[t[m] for t in tensors])

    return (DataLoader(part(0), batch_size=batch_size, shuffle=True),
            DataLoader(part(1), batch_size=256), DataLoader(part(2), batch_size=256))


def _emotion(name: str, seed: int, opts: dict[str, Any]) -> Task:
    d = emotion_dataset(seed=seed, per_piece=opts["per_piece"], variant=EMOTION_TASKS[name])
    keep = training_subset(d["melody"].numpy(), d["split"].numpy(), opts["train_fraction"], seed)
    split = d["split"].masked_fill(~torch.from_numpy(keep), -1)  # -1: in no loader
    tl, vl, te = _loaders([d["mel"], d["label"]], split, opts["batch_size"])

    def evaluate_test(model: torch.nn.Module, device: torch.device,
                      out_dir: Path | None = None) -> dict[str, Any]:
        test = classification_test(model, te, device, EMOTION_CLASSES)
        total = len(te.dataset)  # type: ignore[arg-type]
        counts = torch.bincount(d["label"][d["split"] == 2], minlength=4)
        return {"test_accuracy": test["accuracy"], "test_examples": total,
                "majority_baseline_accuracy": float(counts.max()) / total,
                "classes": list(EMOTION_CLASSES), "confusion": test["confusion_matrix"],
                "test": test}

    info = {"train_examples": len(tl.dataset), "val_examples": len(vl.dataset),
            "test_examples": len(te.dataset), "input_shape": list(d["mel"].shape[1:]),
            "train_fraction": opts["train_fraction"], "variant": EMOTION_TASKS[name]}
    return Task(name, EmotionRecognizer(), tl, vl, te, torch.nn.CrossEntropyLoss(),
                evaluate_test, info)


def _notes(name: str, seed: int, opts: dict[str, Any]) -> Task:
    d = notes_dataset()
    tl, vl, te = _loaders([d["emotion"], d["notes"]], d["split"], opts["batch_size"])
    train_mean = d["notes"][d["split"] == 0].mean(0)

    @torch.no_grad()
    def evaluate_test(model: torch.nn.Module, device: torch.device,
                      out_dir: Path | None = None) -> dict[str, Any]:
        model.eval()
        bce = torch.nn.functional.binary_cross_entropy
        x, y = te.dataset.tensors
        probs = torch.sigmoid(model(x.to(device))).cpu().float()
        base = train_mean.clamp(1e-6, 1 - 1e-6).expand_as(y)
        queries = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], device=device)
        q = torch.sigmoid(model(queries)).cpu()
        names = {64: "E4", 63: "Eb4", 69: "A4", 68: "Ab4", 71: "B4", 70: "Bb4"}
        probe = {mode: {n: round(float(q[i, p]), 4) for p, n in names.items()}
                 for i, mode in enumerate(("major", "minor"))}
        return {"test_bce": float(bce(probs, y)), "mean_baseline_bce": float(bce(base, y)),
                "test_examples": len(y), "scale_degree_probe": probe}

    info = {"train_examples": len(tl.dataset), "val_examples": len(vl.dataset),
            "test_examples": len(te.dataset)}
    return Task("notes", NoteGenerator(), tl, vl, te, torch.nn.BCEWithLogitsLoss(),
                evaluate_test, info)


def build_task(name: str, seed: int, options: dict[str, Any]) -> Task:
    """Build task ``name`` with its options (unknown keys are an error upstream)."""
    opts = {**TASK_OPTIONS[name], **options}
    torch.manual_seed(seed)  # model initialisation
    return (_emotion if name in EMOTION_TASKS else _notes)(name, seed, opts)
