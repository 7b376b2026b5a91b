"""Docstring examples run: every module of the package whose source holds ``>>>`` examples is
run through ``doctest`` (each example's output must match; ``...`` abbreviates)."""

import doctest
import importlib
import pkgutil
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import advanced_training_utils as pkg

SRC = Path(pkg.__file__).parent


def _modules_with_examples() -> list[str]:
    names = [pkg.__name__] + [m.name for m in pkgutil.walk_packages(pkg.__path__,
                                                                     pkg.__name__ + ".")]
    out = []
    for name in names:
        rel = name.split(".")[1:]
        path = SRC.joinpath(*rel) if rel else SRC
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if ">>>" in file.read_text():
            out.append(name)
    return out


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    # The modules known to carry examples; a scan that finds none would make the test vacuous.
    known = {"advanced_training_utils.scheduler", "advanced_training_utils.clipping",
             "advanced_training_utils.metrics", "advanced_training_utils.engine.options"}
    assert known <= set(MODULES)


@pytest.fixture
def keep_rng():
    """Examples may seed torch, random or NumPy: the tests after this one must not notice."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, keep_rng):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(module) if t.examples]
    assert tests, f"{name} has '>>>' in its source but doctest found no example"
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
