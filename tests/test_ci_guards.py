"""The test suite's own guard: under ``CI=true`` a missing reference library fails the tests that need it, outside
CI it skips them, and every test module imports optional libraries through ``tests.conftest.require``.

The subprocess runs real test modules of the suite (which need torch at module level) and a test that needs it
inside its body, with torch made unimportable (``sys.modules["torch"] = None``: Python then refuses to import it),
once with ``CI=true`` and once without.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# Real modules that need torch at module level (directly, and through tests.train.test_step).
MODULE_LEVEL = ["tests/models/test_rope.py", "tests/models/test_layers.py", "tests/peft/test_lora.py"]
INSIDE_A_TEST = """
from tests.conftest import require


def test_needs_torch():
    torch = require("torch")
    assert torch.ones(1).item() == 1.0
"""

RUN_WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; import pytest; "
    "sys.exit(pytest.main(sys.argv[1:]))"
)


def _pytest_without_torch(ci: bool, *targets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_TORCH, "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs",
         "--no-header", "--continue-on-collection-errors", *targets],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _summary(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else result.stderr[-2000:]


@pytest.mark.slow
def test_missing_torch_fails_under_ci_and_skips_otherwise(tmp_path):
    inside = tmp_path / "test_inside.py"
    inside.write_text(INSIDE_A_TEST)
    targets = [*MODULE_LEVEL, str(inside)]

    failing = _pytest_without_torch(True, *targets)
    summary = _summary(failing)
    assert failing.returncode != 0, failing.stdout[-3000:]
    assert "skipped" not in summary, summary
    assert "torch is not importable" in failing.stdout and "required in CI" in failing.stdout, failing.stdout[-3000:]
    # a module-level guard is a collection error of its module; a guard inside a test fails that test
    assert re.search(rf"\b{len(MODULE_LEVEL)} errors\b", summary) and re.search(r"\b1 failed\b", summary), summary

    skipping = _pytest_without_torch(False, *targets)
    summary = _summary(skipping)
    assert skipping.returncode == 0, skipping.stdout[-3000:]
    assert re.search(rf"\b{len(targets)} skipped\b", summary), summary
    assert "failed" not in summary and "error" not in summary, summary


GUARDS = re.compile(r"importorskip|except\s+(\(?\s*)?(ImportError|ModuleNotFoundError)")


def test_no_module_has_an_import_guard_of_its_own():
    offenders = []
    for path in sorted(pathlib.Path(REPO_ROOT, "tests").rglob("*.py")):
        if path.name in ("conftest.py", "test_ci_guards.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if GUARDS.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use tests.conftest.require instead:\n" + "\n".join(offenders)
