"""Fetch the test assets that ../shared/assets lacks from pinned packages on the pip registry, into the gitignored
``.cache/test-assets/`` (or ``$SFTJAX_TEST_ASSET_CACHE``). Idempotent: a file already there with the right
sha256 is kept. Each file is checked against its sha256; a mismatch or a failed download exits non-zero with one
line naming the file.

* ``gpt-oss/chat_template.jinja``: gpt-oss's chat template (the Harmony format), as llama.cpp vendors it, from
  the ``llama-cpp-python`` source distribution.
* ``o200k/o200k_base.tiktoken``: the o200k_base BPE ranks (gpt-oss's vocabulary before its Harmony special
  tokens), as the ``litellm`` wheel ships them; openai-harmony reads them from this directory
  (``TIKTOKEN_ENCODINGS_BASE``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("SFTJAX_TEST_ASSET_CACHE", REPO / ".cache" / "test-assets"))

# (cache path, pip requirement, sdist?, member inside the archive, sha256)
ASSETS = (
    ("gpt-oss/chat_template.jinja", "llama-cpp-python==0.3.36", True,
     "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/openai-gpt-oss-120b.jinja",
     "a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146"),
    ("o200k/o200k_base.tiktoken", "litellm==1.110.2", False,
     "litellm/litellm_core_utils/tokenizers/fb374d419588a4632f3f557e76b4b70aebbca790",
     "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(requirement: str, sdist: bool, into: pathlib.Path) -> pathlib.Path:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), requirement]
    if sdist:
        command[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    files = sorted(into.iterdir())
    if result.returncode != 0 or not files:
        detail = " ".join((result.stderr or result.stdout).split())[-200:]
        raise SystemExit(f"fetch_test_assets: pip could not download {requirement}: {detail}")
    return files[0]


def _member(archive: pathlib.Path, member: str) -> bytes:
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            handle = tar.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    with zipfile.ZipFile(archive) as wheel:
        return wheel.read(member)


def fetch(path: str, requirement: str, sdist: bool, member: str, sha256: str) -> pathlib.Path:
    target = CACHE / path
    if target.is_file() and _sha256(target.read_bytes()) == sha256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(requirement, sdist, pathlib.Path(tmp))
        try:
            data = _member(archive, member)
        except KeyError:
            raise SystemExit(f"fetch_test_assets: {archive.name} has no {member}") from None
    if _sha256(data) != sha256:
        raise SystemExit(f"fetch_test_assets: {member} from {requirement} has sha256 {_sha256(data)}, "
                         f"expected {sha256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def main() -> int:
    for asset in ASSETS:
        print(f"fetch_test_assets: {fetch(*asset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
