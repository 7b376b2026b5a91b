"""Run reports: a diagnosis of a training history and a PNG of its curves and results."""

from .details import load_run_details
from .diagnosis import Finding, diagnose, format_diagnosis
from .plots import RunDetails, build_report_figure, plot_history

__all__ = ["Finding", "RunDetails", "build_report_figure", "diagnose", "format_diagnosis",
           "load_run_details", "plot_history"]
