from __future__ import annotations

import time
from pathlib import Path

import pytest

import procs
from runs import make_classification_file
from slurm_cluster import install_if_needed

# Left to a test between its processes' timeouts and its pytest timeout: killing process groups, reading logs.
CLEANUP_MARGIN_S = 15


def pytest_collection_finish(session):
    # SLURM, when a collected test needs it and it is missing, is installed before any test runs, under its own
    # time limit (slurm_cluster.INSTALL_TIMEOUT_S) instead of inside the first such test's timeout.
    install_if_needed(session)


# pytest-timeout starts a test's timer (covering its fixtures, module-scoped ones included) with the timeout
# it resolved from the marker, the command line or pyproject; the processes the test starts must end first.
@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    procs.set_test_deadline(time.monotonic() + settings.timeout - CLEANUP_MARGIN_S)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    procs.set_test_deadline(None)




@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    return make_classification_file(tmp_path_factory.mktemp("data") / "tiny.h5")

