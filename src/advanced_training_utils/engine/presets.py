"""Named option sets for ``train_model_advanced``, held as data.

============  ===========  =====  ===  =======  ==========  ===========
preset        scheduler    clip   amp  augment  early stop  stability
============  ===========  =====  ===  =======  ==========  ===========
fast          onecycle     none   yes  no       5           no
stable        plateau      1.0    no   yes      15          yes
memory_       cosine       0.5    yes  no       10          no
constrained
============  ===========  =====  ===  =======  ==========  ===========

"early stop" is ``early_stop_patience``; every preset leaves the plateau scheduler's
``plateau_patience`` at its default (5).

``memory`` is an alias of ``memory_constrained``. It does not turn the batch-size finder on (a
preset holds these options; the batch size is the caller's loader's): pair it with
``engine.batchfind.find_batch_size``, or ``advtrain train --set batch_size=auto``.
"""

from __future__ import annotations

import copy
from typing import Any

from .._validate import check_choice
from .config import TrainConfig

__all__ = ["PRESETS", "PRESET_ALIASES", "get_preset"]

PRESETS: dict[str, dict[str, Any]] = {
    "fast": {
        "use_scheduler": True,
        "scheduler_type": "onecycle",
        "gradient_clip": None,
        "use_mixed_precision": True,
        "use_augmentation": False,
        "early_stop_patience": 5,
    },
    "stable": {
        "use_scheduler": True,
        "scheduler_type": "plateau",
        "gradient_clip": 1.0,
        "use_mixed_precision": False,
        "use_augmentation": True,
        "early_stop_patience": 15,
        "check_stability": True,
    },
    "memory_constrained": {
        "use_scheduler": True,
        "scheduler_type": "cosine",
        "gradient_clip": 0.5,
        "use_mixed_precision": True,
        "use_augmentation": False,
        "early_stop_patience": 10,
    },
}

PRESET_ALIASES = {"memory": "memory_constrained"}


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` with ``overrides`` applied.

    Raises:
        ValueError: unknown preset name (the message lists the valid ones).
        TypeError: an override that is not an option of ``train_model_advanced``.
    """
    name = PRESET_ALIASES.get(name, name)
    check_choice("preset", name, [*PRESETS, *PRESET_ALIASES])
    out = copy.deepcopy(PRESETS[name])
    out.update(overrides)
    TrainConfig.from_options(**out)  # reject unknown or invalid overrides now
    return out
