"""``advtrain train --data``: a task over the user's own audio (a labels CSV or class folders).

Two steps, so every option is checked before any audio is decoded:

1. :func:`plan_audio` reads the layout's listing only (the CSV's rows, or the folder's files) and
   settles what the targets are: a missing CSV or folder, a folder without audio, an unknown
   column, an unknown split name or a bad target value is a ``ValueError`` /
   ``FileNotFoundError`` here. :func:`check_audio_options` checks the task's own options.
2. :func:`build_audio_task` decodes and featurises every clip once (through the feature cache,
   :func:`~.audio.load_audio_splits`), and returns a :class:`~.tasks.Task`: the model
   (:class:`~.models.EmotionRecognizer` for C classes, :class:`~.models.EmotionRegressor` for K
   targets), cross-entropy or MSE, the loaders, and the held-out evaluation.

The training loader draws its order from a generator seeded with the run's seed through
:class:`~.audio.EpochSampler`, which passes each epoch to the dataset (a new random crop per clip
per epoch). The test split is evaluated whole (every clip, its centre window of the training
length, or the whole clip with ``eval_crop="whole"``) with :mod:`advanced_training_utils.metrics`
(epoch-level statistics, not batch means; :mod:`.evaluation`): ``{"uar", "macro_f1", "accuracy",
"per_class_recall": {class: recall}, "confusion_matrix", "class_names"}`` for classification (a
class absent from the test split has recall None), ``{"ccc", "ccc_<target>", "mae",
"mae_<target>"}`` for regression, with a sample of the test predictions in the run directory's
``test_predictions.npz`` for the report's scatter plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._validate import check_choice, check_int, check_real
from .audio import EpochSampler, LogMel, load_audio_splits
from .audio.corpus import Corpus, read_csv_corpus, read_folder_corpus
from .audio.features import ON_ERROR
from .audio.normalize import NORMALIZATIONS
from .audio.options import EVAL_CROPS
from .audio.targets import encode_targets
from .evaluation import classification_test, regression_test
from .models import EmotionRecognizer, EmotionRegressor
from .tasks import Task

__all__ = ["AUDIO_OPTIONS", "AUDIO_TASK", "AUDIO_TRAIN_DEFAULTS", "FEATURES", "AudioPlan", "DataSpec",
           "build_audio_task", "check_audio_options", "make_logmel", "plan_audio",
           "train_defaults"]

#: The task's name: the model name of its checkpoints and ``"task"`` in summary.json.
AUDIO_TASK = "audio"

#: Feature presets: ``speech`` (16 kHz, 25 ms window, 10 ms hop, up to 8 kHz) and ``chorale``
#: (the built-in tasks' features: 1024-point FFT, 16 ms hop, 50 Hz - 4 kHz).
FEATURES = ("speech", "chorale")

#: The task's own options (``--set key=value``), with their defaults.
AUDIO_OPTIONS: dict[str, Any] = {
    "batch_size": 32,
    "n_mels": 64,               # >= 16 (the model pools four times)
    "features": "speech",
    "crop_seconds": None,       # None: 90th percentile of training durations (capped at 10 s)
    "normalization": "utterance",
    "eval_crop": "center",
    "on_error": "skip",
    "memory_budget": None,      # bytes or '2GiB': for batch_size='auto' off CUDA (.batchsize)
}

#: Training defaults (a preset, a config file and --set override them); ``metrics: accuracy``
#: is added for classification (see :func:`train_defaults`).
AUDIO_TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 30, "learning_rate": 3e-3, "augment": "audio"}

#: Evaluation batch size (the loaders of val and test).
EVAL_BATCH = 64


@dataclass(frozen=True)
class DataSpec:
    """Where the corpus is and how to read it (the ``--data`` group of ``advtrain train``)."""

    data: Path
    target: str | None = None
    path_column: str = "path"
    split_column: str | None = None
    group_column: str | None = None


@dataclass(frozen=True)
class AudioPlan:
    """What :func:`plan_audio` found: the task kind and the names of its outputs."""

    spec: DataSpec
    kind: str                               # "classification" or "regression"
    class_names: list[str] | None
    target_names: list[str]
    files: int


def _listing(spec: DataSpec) -> Corpus:
    path = Path(spec.data)
    if path.is_dir():
        given = {"--target": spec.target, "--split-column": spec.split_column,
                 "--group-column": spec.group_column,
                 "--path-column": None if spec.path_column == "path" else spec.path_column}
        bad = [k for k, v in given.items() if v is not None]
        if bad:
            raise ValueError(f"--data {path} is a folder (one subfolder per class): "
                             f"{', '.join(bad)} apply to a labels CSV only")
        return read_folder_corpus(path)
    if path.suffix.lower() == ".csv":
        if spec.target is None:
            raise ValueError(f"--data {path} is a CSV: --target must name its label column(s), "
                             "e.g. --target emotion or --target valence,arousal")
        return read_csv_corpus(path, spec.target, spec.path_column, spec.split_column,
                               spec.group_column)
    raise FileNotFoundError(f"--data must be a labels .csv file or a folder of class "
                            f"subfolders, got {str(path)!r}"
                            + ("" if path.exists() else " (not found)"))


def plan_audio(spec: DataSpec) -> AudioPlan:
    """Read the listing of ``spec`` (no audio decoded) and settle the task kind.

    Raises:
        FileNotFoundError: the CSV or folder does not exist, or ``data`` is neither.
        ValueError: CSV options on a folder, no ``target`` for a CSV, an unknown column, a bad
            split name, an empty or non-numeric target cell, or a folder with no audio files.
    """
    corpus = _listing(spec)
    _, kind, class_names = encode_targets(corpus.columns)
    if kind == "classification" and len(class_names or []) < 2:
        raise ValueError(f"--data {spec.data}: classification needs at least 2 classes, found "
                         f"{class_names}")
    return AudioPlan(spec, kind, class_names, list(corpus.columns), len(corpus))


def train_defaults(plan: AudioPlan | None) -> dict[str, Any]:
    """The training defaults for ``plan``: the field's validation metrics are logged (UAR,
    macro-F1 and accuracy for classification; CCC and MAE for regression). Model selection
    follows the validation loss unless ``--set monitor=val_uar --set mode=max`` says otherwise."""
    if plan is None:
        extra: dict[str, Any] = {}
    elif plan.kind == "classification":
        extra = {"metrics": ["uar", "macro_f1", "accuracy"]}
    else:
        extra = {"metrics": ["ccc", "mae"]}
    return {**AUDIO_TRAIN_DEFAULTS, **extra}


def check_audio_options(options: dict[str, Any]) -> dict[str, Any]:
    """The task's options (defaults filled in) after checking each; builds the LogMel once to
    reject a feature setup it cannot compute (e.g. too many mels for the FFT size).

    Raises:
        TypeError, ValueError: naming the option, the value and what is allowed.
    """
    opts = {**AUDIO_OPTIONS, **options}
    if opts["batch_size"] != "auto":  # the batch-size finder's (.batchsize)
        check_int("batch_size", opts["batch_size"], low=1)
    check_int("n_mels", opts["n_mels"], low=16)
    check_choice("features", opts["features"], FEATURES)
    if opts["crop_seconds"] is not None:
        check_real("crop_seconds", opts["crop_seconds"], low=0.0, low_inclusive=False)
    check_choice("normalization", opts["normalization"], NORMALIZATIONS)
    check_choice("eval_crop", opts["eval_crop"], EVAL_CROPS)
    check_choice("on_error", opts["on_error"], ON_ERROR)
    make_logmel(opts)
    return opts


def make_logmel(opts: dict[str, Any]) -> LogMel:
    """The feature module of the options ``features`` and ``n_mels``."""
    if opts["features"] == "chorale":
        return LogMel.chorale(n_mels=opts["n_mels"])
    return LogMel(n_mels=opts["n_mels"])


def _evaluator(plan: AudioPlan, loader: DataLoader | None) -> Any:
    def evaluate_test(model: torch.nn.Module, device: torch.device,
                      out_dir: Path | None = None) -> dict[str, Any]:
        if loader is None or len(loader.dataset) == 0:  # type: ignore[arg-type]
            return {"test": None, "test_examples": 0}
        if plan.kind == "classification":
            values = classification_test(model, loader, device, plan.class_names or [])
        else:
            values = regression_test(model, loader, device, plan.target_names, out_dir)
        return {"test": values, "test_examples": len(loader.dataset)}  # type: ignore[arg-type]

    return evaluate_test


def build_audio_task(plan: AudioPlan, seed: int, options: dict[str, Any]) -> Task:
    """Decode, featurise and split the corpus; the model, loss, loaders and test evaluation.

    Args:
        plan: from :func:`plan_audio`.
        seed: seeds the model's initialisation, the training order and the training crops
            (the split itself uses the fixed split seed of :mod:`.audio.splits`).
        options: the task's options (see :data:`AUDIO_OPTIONS`), checked.
    """
    opts = check_audio_options(options)
    spec = plan.spec
    reading = {} if Path(spec.data).is_dir() else {
        "target": spec.target, "path_column": spec.path_column,
        "split_column": spec.split_column, "group_column": spec.group_column}
    splits = load_audio_splits(
        spec.data, **reading, features=make_logmel(opts), task=plan.kind,
        crop_seconds=opts["crop_seconds"], normalization=opts["normalization"],
        eval_crop=opts["eval_crop"], on_error=opts["on_error"],
        generator=torch.Generator().manual_seed(seed))
    train, val, test = splits.train, splits.val, splits.test
    bs = opts["batch_size"]
    order = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=bs, sampler=EpochSampler(train, generator=order),
                              collate_fn=train.collate)
    val_loader = DataLoader(val, batch_size=EVAL_BATCH, collate_fn=val.collate)
    test_loader = (None if test is None
                   else DataLoader(test, batch_size=EVAL_BATCH, collate_fn=test.collate))
    torch.manual_seed(seed)  # model initialisation
    if plan.kind == "classification":
        model: torch.nn.Module = EmotionRecognizer(n_mels=opts["n_mels"],
                                                   num_classes=len(plan.class_names or []))
        criterion: torch.nn.Module = torch.nn.CrossEntropyLoss()
    else:
        model = EmotionRegressor(n_mels=opts["n_mels"], num_targets=len(plan.target_names))
        criterion = torch.nn.MSELoss()
    info = {**splits.summary, "input_shape": [1, opts["n_mels"], splits.summary["crop_frames"]],
            "model": type(model).__name__}
    return Task(AUDIO_TASK, model, train_loader, val_loader, test_loader,  # type: ignore[arg-type]
                criterion, _evaluator(plan, test_loader), info)
