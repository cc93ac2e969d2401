"""Every subcommand given bad arguments or bad files fails with exit code 2 and one line on stderr, no traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests.conftest import error_line

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def _files(tmp: pathlib.Path) -> dict:
    (tmp / "broken.yaml").write_text("model: [unclosed\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    (tmp / "list.yaml").write_text("- just\n- a list\n")
    (tmp / "dir.yaml").mkdir()
    (tmp / "run").mkdir()
    return {"tmp": tmp}


CASES = [
    (["frobnicate"], "invalid choice"),
    (["train"], "the following arguments are required: config"),
    (["train", "{tmp}/missing.yaml"], "does not exist"),
    (["train", "{tmp}/broken.yaml"], "not valid YAML"),
    (["train", "{tmp}/binary.yaml"], "not valid YAML"),
    (["train", "{tmp}/list.yaml"], "top level must be a mapping"),
    (["train", "{tmp}/dir.yaml"], "does not exist"),
    (["train", TINY, "no_equals_sign"], "must look like key.sub=value"),
    (["train", TINY, "model.attention_implementation=flash9"], "choose one of auto, reference, xla_chunked"),
    (["train", TINY, "model.cross_entropy_implementation=fused"], "choose one of auto, reference"),
    (["eval", TINY, "--answer", "fuzzy", "--generate"], "not one of exact, number, gsm8k"),
    (["eval", TINY, "--answer", "regex:(", "--generate"], "not a valid regular expression"),
    (["eval", TINY, "--from", "{tmp}/run"], "nothing trained to evaluate"),
    (["eval", TINY, "--limit", "many"], "invalid int value"),
    (["data"], "the following arguments are required"),
    (["data", "preview", "{tmp}/missing.yaml"], "does not exist"),
    (["data", "preview", "{tmp}/broken.yaml"], "not valid YAML"),
    (["generate", "{tmp}/no_model", "--prompt", "hi"], "does not exist"),
    (["generate", "smollm2-135m-instruct"], "the following arguments are required: --prompt"),
    (["generate", "{tmp}/run", "--prompt", "hi"], "config.json"),
    (["chat", "{tmp}/no_model"], "does not exist"),
    (["export", "{tmp}/no_run", "{tmp}/out"], "does not exist"),
    (["export", "{tmp}/run", "{tmp}/out", "--format", "zip"], "invalid choice: 'zip'"),
    (["export", "{tmp}/run", "{tmp}/out"], "no sftjax checkpoint found"),
    (["plan", TINY, "--target", "v9x-8"], "unknown target 'v9x-8': choose one of"),
    (["plan", TINY, "--mfu", "2"], "--mfu 2.0 must be in (0, 1]"),
    (["plan", TINY, "--device", "tpu-v9"], "invalid choice"),
    (["plan", "{tmp}/missing.yaml"], "does not exist"),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_arguments_and_files_are_one_line(tmp_path, argv, words):
    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    done = subprocess.run([sys.executable, "-m", "sftjax.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    err = error_line(done.stderr)
    assert words in err, err
