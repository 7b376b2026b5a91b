"""Run reports: a diagnosis of a training history and a PNG of its curves."""

from .diagnosis import Finding, diagnose, format_diagnosis
from .plots import plot_history

__all__ = ["Finding", "diagnose", "format_diagnosis", "plot_history"]
