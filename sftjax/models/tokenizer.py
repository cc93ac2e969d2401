"""``load_tokenizer``: a transformers tokenizer from a checkpoint directory, a tokenizer directory, an alias, or a
.gguf file's embedded vocabulary. Imports no jax (``sftjax data preview`` uses it).
"""

from __future__ import annotations

from sftjax.errors import CheckpointError
from sftjax.models import gguf_read
from sftjax.models.zoo import resolve_model_path


def load_tokenizer(path_or_alias):
    """A transformers tokenizer from a checkpoint directory, or from a .gguf file's embedded vocabulary."""
    path = resolve_model_path(path_or_alias)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_read.load_gguf_tokenizer(path)
    if not path.exists():
        raise CheckpointError(f"{path}: tokenizer path does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types for unusable tokenizer files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot load a tokenizer ({message})") from None
