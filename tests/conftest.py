from __future__ import annotations

from pathlib import Path

import pytest

from runs import make_classification_file
from slurm_cluster import install_if_needed


def pytest_collection_finish(session):
    # SLURM, when a collected test needs it and it is missing, is installed before any test runs, under its own
    # time limit (slurm_cluster.INSTALL_TIMEOUT_S) instead of inside the first such test's timeout.
    install_if_needed(session)




@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    return make_classification_file(tmp_path_factory.mktemp("data") / "tiny.h5")

