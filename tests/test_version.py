"""The package's conventions: ``__version__`` from the metadata, ``py.typed``, ``LICENSE``."""

import importlib
import sys
from importlib import metadata
from pathlib import Path

import pytest

import advanced_training_utils
from advanced_training_utils import _version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(advanced_training_utils.__file__).parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_comes_from_the_package_metadata():
    expected = metadata.version("advanced-training-utils")
    assert advanced_training_utils.__version__ == expected == _version.package_version()
    assert "__version__" in advanced_training_utils.__all__


def test_version_follows_the_metadata_not_a_literal(monkeypatch):
    monkeypatch.setattr(_version.metadata, "version", lambda dist: "9.8.7")
    assert _version.package_version() == "9.8.7"


def test_version_when_not_installed_is_unknown(monkeypatch):
    def not_installed(dist):
        raise metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(_version.metadata, "version", not_installed)
    assert _version.package_version() == "0+unknown"
    monkeypatch.delitem(sys.modules, "advanced_training_utils")  # a fresh import, not installed
    fresh = importlib.import_module("advanced_training_utils")
    assert fresh.__version__ == "0+unknown"


def test_installed_metadata_matches_pyproject():
    assert metadata.version("advanced-training-utils") == _pyproject()["project"]["version"]


def test_py_typed_marker_is_shipped():
    assert (PACKAGE / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"][
        "advanced_training_utils"]


def test_license_file_is_mit_as_declared():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and "LICENSE" in project["license-files"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) advanced-training-utils contributors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text


def test_tensorboard_is_a_declared_extra():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    assert any(r.startswith("tensorboard") for r in extras["dev"])  # so its test runs in CI
