"""The accelerator pre-flight: checks that need the accelerator env (``scripts/accel_env.sh``: the jax of the
GPU/TPU machines, libtpu, triton) and are run by ``scripts/preflight.sh``.

The ordinary test run does not collect this folder; ``SFTJAX_PREFLIGHT=1`` (set by the pre-flight) does. A
missing libtpu or triton skips with the reason, except under ``CI=true``, where it fails: CI must run the
pre-flight for real. A new check is a new ``test_*.py`` file here.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if os.environ.get("SFTJAX_PREFLIGHT") != "1":
    collect_ignore_glob = ["test_*.py"]


def require(module: str, install: str) -> None:
    """Skip (fail under CI=true) unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = f"{module} is not installed ({install}; scripts/accel_env.sh installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: the pre-flight must run in CI")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def libtpu():
    import jax

    require("libtpu", f'pip install "jax[tpu]=={jax.__version__}"')


@pytest.fixture(scope="session")
def triton_package():
    require("triton", "pip install triton==3.6.0")
