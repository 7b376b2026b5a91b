"""The study of ``advtrain tune``: stored in SQLite under the tune's folder, so that a tune that
was stopped (or killed) resumes where it was.

* ``DIR/study.db`` holds one study, :data:`STUDY_NAME`; a second ``advtrain tune`` on the same
  folder continues it. Its settings (task, monitor, mode, epochs, the space's options) are kept
  as a study attribute and must match: another objective in the same study would mix values
  that cannot be compared.
* A trial left ``RUNNING`` (its tune was killed) is marked ``FAIL`` with the user attribute
  ``interrupted`` and its parameters are queued again (:func:`recover_interrupted`); it does not
  count toward ``--trials``. A trial that ended by itself (complete, pruned, failed: its error or
  its timeout) counts (:func:`finished_count`), so a failing configuration cannot loop forever.
* The pruners (:func:`make_pruner`) are built the same way in the tune and in each trial's
  process, which asks them after each epoch.

optuna is imported by the functions that need it (it is the ``tune`` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["STUDY_NAME", "PRUNERS", "storage_url", "make_pruner", "open_study",
           "recover_interrupted", "finished_count", "StudyMismatch"]

log = logging.getLogger(__name__)

#: The one study of a tune folder.
STUDY_NAME = "advtrain-tune"
#: ``--pruner`` choices.
PRUNERS = ("median", "asha")
#: MedianPruner: once 2 trials completed, a trial whose best value so far is worse than the
#: completed trials' median at the same epoch is pruned, from its first epoch (steps are epochs,
#: counted from 1; optuna skips steps below the warm-up), so that a 6-trial study can prune.
MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_EPOCHS = 2, 0
#: SuccessiveHalvingPruner (ASHA): rungs at 1, 3, 9... epochs; the top third goes on.
ASHA_MIN_EPOCHS, ASHA_REDUCTION = 1, 3


class StudyMismatch(ValueError):
    """The folder's study was started with other settings."""


def storage_url(folder: Path) -> str:
    """The SQLite URL of the study in ``folder`` (``folder/study.db``)."""
    return f"sqlite:///{(Path(folder) / 'study.db').resolve()}"


def make_pruner(name: str) -> Any:
    """``median`` (optuna's MedianPruner) or ``asha`` (its SuccessiveHalvingPruner)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS,
                                           n_warmup_steps=MEDIAN_WARMUP_EPOCHS)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=ASHA_MIN_EPOCHS,
                                                      reduction_factor=ASHA_REDUCTION)
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


def open_study(folder: Path, settings: dict[str, Any], pruner: str, seed: int) -> Any:
    """Create or load the study of ``folder``; ``settings`` (plain values) must equal the
    stored ones. The sampler (TPE) is seeded with ``seed`` and the number of trials so far, so a
    resumed tune does not draw the first run's parameters again.

    Raises:
        StudyMismatch: the stored study has other settings.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(folder)
    direction = "maximize" if settings["mode"] == "max" else "minimize"
    study = optuna.create_study(storage=url, study_name=STUDY_NAME, direction=direction,
                                pruner=make_pruner(pruner), load_if_exists=True)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        diff = [f"{k}: {stored.get(k)!r} -> {settings.get(k)!r}"
                for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        raise StudyMismatch(f"{folder} holds a study with other settings ({'; '.join(diff)}); "
                            "use another --out, or the same settings to continue it")
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return study


def recover_interrupted(study: Any) -> list[int]:
    """Mark the trials left RUNNING by a killed tune FAIL (``interrupted``) and queue their
    parameters again; return their numbers. Only call it while holding the tune's lock (a live
    tune's running trial must not be touched)."""
    from optuna.trial import TrialState

    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # optuna's storage is addressed by the internal trial id (as its own
        # fail_stale_trials does).
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        numbers.append(t.number)
    if numbers:
        log.warning("tune: trial(s) %s were interrupted (their tune was stopped); marked FAIL "
                    "and queued again", numbers)
    return numbers


def finished_count(study: Any) -> int:
    """Trials that ended by themselves: complete, pruned, or failed (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")))
