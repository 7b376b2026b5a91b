"""``advtrain tune``: the search space (:mod:`.space`), the stored study and its pruners
(:mod:`.study`), one trial's process (:mod:`.trial`), the outputs (:mod:`.outputs`) and the
command (:mod:`.command`)."""

from .command import TunePlan, add_parser, main
from .space import Dimension, SpaceError, read_space
from .trial import PruningReporter

__all__ = ["add_parser", "main", "TunePlan", "Dimension", "SpaceError", "read_space",
           "PruningReporter"]
