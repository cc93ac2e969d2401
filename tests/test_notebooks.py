"""The notebooks in notebooks/ are stored without outputs and run end to end (nbclient, a fresh kernel, the CPU).

Each notebook checks its own results with ``assert`` (an export's logits against transformers, eval losses that
go down, the batch contract on every packed row); a failing cell fails the test with the cell's traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest

from tests.conftest import require

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "research.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], (f"{path.name} cell {index} has outputs: clear them before committing "
                                           "(Jupyter: Edit > Clear Outputs of All Cells)")
            assert cell["execution_count"] is None, f"{path.name} cell {index} has an execution count"


def _execute(path: pathlib.Path, assets_dir: pathlib.Path, tmp_path: pathlib.Path):
    nbformat = require("nbformat")
    NotebookClient = require("nbclient").NotebookClient
    notebook = nbformat.read(path, as_version=4)
    # The kernel gets a clean CPU environment: one device (the test session's fake 8-device XLA flag is dropped),
    # this checkout first on the path, the shared assets, caches under the test's temporary directory.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env.update(JAX_PLATFORMS="cpu", SFTJAX_ASSETS=str(assets_dir), SFTJAX_CACHE_DIR=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=env)
    print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s")
    return notebook


def _outputs(notebook, kind: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if kind in o.get("data", {})]


@pytest.mark.slow
def test_quickstart_runs(assets_dir, smollm2_gguf, tmp_path):
    notebook = _execute(REPO / "notebooks" / "quickstart.ipynb", assets_dir, tmp_path)
    html = "".join(o["data"]["text/html"] for o in _outputs(notebook, "text/html"))
    assert 'style="background:#c6f0c2' in html and 'style="color:#888"' in html  # trained and untrained tokens
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "largest difference relative to the largest logit" in text and "assistant:" in text


@pytest.mark.slow
def test_research_runs(assets_dir, tmp_path):
    notebook = _execute(REPO / "notebooks" / "research.ipynb", assets_dir, tmp_path)
    assert len(_outputs(notebook, "image/png")) == 3  # packing efficiency, segments/mask, loss curves
    assert len(_outputs(notebook, "text/html")) == 3  # the three masking modes
