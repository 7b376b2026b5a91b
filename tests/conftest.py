import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
    yield


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """Rendered data and features cached under the session's temp folder, not ~/.cache."""
    monkeypatch.setenv("ADVTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
