"""The package version, read from the installed distribution's metadata (``pyproject.toml``
is the one place that holds it)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["DIST_NAME", "UNKNOWN_VERSION", "package_version"]

#: The distribution name on PyPI / in ``pyproject.toml``.
DIST_NAME = "advanced-training-utils"

#: The version reported when the package runs from a source tree that is not installed
#: (e.g. ``PYTHONPATH=src``): a PEP 440 local version that sorts below every release.
UNKNOWN_VERSION = "0+unknown"


def package_version(dist: str = DIST_NAME) -> str:
    """The installed version of ``dist``, or :data:`UNKNOWN_VERSION` if it is not installed.

    Example:
        >>> package_version("surely-not-an-installed-distribution")
        '0+unknown'
    """
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION
