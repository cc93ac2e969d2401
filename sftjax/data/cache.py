"""Tokenize a dataset source in parallel and cache the result on disk.

Why: rendering chat templates and tokenizing is the slow part of data preparation (seconds for GSM8K, minutes
for a million rows); a second run with the same inputs should start at once. The cache is keyed by everything
the tokens depend on: the source's files (paths, sizes, mtimes), the tokenizer's identity (a hash of its full
serialized vocabulary/merges/added tokens), the chat template text actually used, and the row-reading and
masking settings. Change any of them and the key changes, so a stale cache is never read. Files are written
atomically (temp file + rename), so a crashed or concurrent writer never leaves a half-written cache behind.

Examples are stored flat (see :class:`~sftjax.data.packing.TokenizedExamples`) in one ``.npz`` per source,
untruncated: ``max_length`` and the overflow mode are applied at packing time, so changing them reuses the
cache. Rows are read in the main process and tokenized in row chunks by a pool of spawned worker processes
(spawn, not fork: the parent may already run JAX threads).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import tempfile
import weakref
from collections.abc import Callable

import numpy as np

from sftjax.data.packing import TokenizedExamples
from sftjax.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # raised whenever encoding rules change (2: Harmony turns, multi-call check)
CHUNK_ROWS = 512
PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves


@dataclasses.dataclass
class TokenizedSource:
    """One source's examples plus what was dropped (reason -> count) and whether the cache supplied it."""

    path: str
    examples: TokenizedExamples
    dropped: dict[str, int]
    from_cache: bool
    cache_file: str | None = None


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SFTJAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "sftjax" / "tokenized"))


def files_fingerprint(path: str) -> list:
    """(relative path, size, mtime_ns) of the file, or of every file under the directory."""
    root = pathlib.Path(path)
    if not root.exists():
        raise DataError(f"{path}: dataset path does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return entries


_TOKENIZER_HASHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (fast tokenizers: their serialized JSON, else the vocabulary).

    Serializing a 150k vocabulary takes most of a second, so the hash is remembered per tokenizer object (and
    recomputed if its size changed, e.g. after ``add_tokens``).
    """
    size = len(tokenizer)
    try:
        cached = _TOKENIZER_HASHES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    digest = hashlib.sha256((text + special + type(tokenizer).__name__).encode()).hexdigest()
    try:
        _TOKENIZER_HASHES[tokenizer] = (size, digest)
    except TypeError:
        pass
    return digest


def cache_key(source, tokenizer, *, masking: str, chat_template: str | None, on_bad_row: str, encoder_name: str,
              train_reasoning: str = "all") -> str:
    """The hash naming the cache file; ``chat_template`` is the resolved template *text*."""
    description = {
        "version": CACHE_FORMAT_VERSION,
        "files": files_fingerprint(source.path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": chat_template,
        "masking": masking,
        "train_reasoning": train_reasoning,
        "on_bad_row": on_bad_row,
        "encoder": encoder_name,
        "source": {
            "format": source.format,
            "columns": dict(sorted(source.columns.items())),
            "json_field": source.json_field,
            "split": source.split,
            "system_prompt": source.system_prompt,
        },
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _default_encoder():
    from sftjax.data.chat import encode_example

    return encode_example


# ----------------------------------------------------------------------------------------------------------------
# Worker side. Exceptions are turned into plain data: DataError subclasses with extra constructor arguments do
# not survive pickling.

_worker: dict = {}


def _init_worker(encode_fn, tokenizer, encode_kwargs, on_bad_row):
    _worker.update(encode_fn=encode_fn or _default_encoder(), tokenizer=tokenizer, kwargs=encode_kwargs,
                   on_bad_row=on_bad_row)


def _encode_chunk(rows: list[tuple[str, dict]]):
    """-> (ids, mask, lengths, dropped Counter, error message or None)."""
    encode_fn, tokenizer, kwargs = _worker["encode_fn"], _worker["tokenizer"], _worker["kwargs"]
    ids, masks, lengths = [], [], []
    dropped: collections.Counter = collections.Counter()
    for location, row in rows:
        try:
            example = encode_fn(row, tokenizer, location=location, **kwargs)
        except DataError as err:
            reason = getattr(err, "reason", None)
            # Same policy as chat.encode_rows: in "error" mode only an example emptied by truncation is dropped
            # quietly (counted); a row with no assistant turn or no trained token is bad input and raises.
            truncated_away = (reason or "").endswith("after_truncation")
            if truncated_away or _worker["on_bad_row"] == "skip":
                dropped[reason or "bad_row"] += 1
                continue
            return None, None, None, dropped, str(err)
        ids.append(np.asarray(example["input_ids"], dtype=np.int32))
        masks.append(np.asarray(example["train_mask"], dtype=np.uint8))
        lengths.append(ids[-1].size)
    if not ids:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(0, np.int64), dropped, None
    return np.concatenate(ids), np.concatenate(masks), np.asarray(lengths, np.int64), dropped, None


def _encode_rows(rows, encode_fn, tokenizer, encode_kwargs, on_bad_row, num_workers) -> tuple[TokenizedExamples, dict]:
    chunks = [rows[i : i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    if num_workers <= 1 or len(chunks) <= 1:
        _init_worker(encode_fn, tokenizer, encode_kwargs, on_bad_row)
        results = map(_encode_chunk, chunks)
        return _collect(results)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(num_workers, len(chunks)), mp_context=context, initializer=_init_worker,
        initargs=(encode_fn, tokenizer, encode_kwargs, on_bad_row),
    ) as executor:
        return _collect(executor.map(_encode_chunk, chunks))


def _collect(results) -> tuple[TokenizedExamples, dict]:
    ids, masks, lengths = [], [], []
    dropped: collections.Counter = collections.Counter()
    for chunk_ids, chunk_mask, chunk_lengths, chunk_dropped, error in results:
        if error is not None:
            raise DataError(error)
        ids.append(chunk_ids)
        masks.append(chunk_mask)
        lengths.append(chunk_lengths)
        dropped.update(chunk_dropped)
    if not ids:
        return TokenizedExamples.empty(), dict(dropped)
    all_lengths = np.concatenate(lengths)
    offsets = np.zeros(all_lengths.size + 1, np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    return TokenizedExamples(np.concatenate(ids), np.concatenate(masks), offsets), dict(dropped)


# ----------------------------------------------------------------------------------------------------------------


def _load(cache_file: pathlib.Path) -> tuple[TokenizedExamples, dict] | None:
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            examples = TokenizedExamples(data["input_ids"], data["train_mask"], data["offsets"])
            dropped = json.loads(str(data["dropped"]))
        return examples, dropped
    except (OSError, KeyError, ValueError, DataError) as err:  # unreadable or corrupt: recompute
        logger.warning("ignoring unreadable tokenization cache %s (%s)", cache_file, err)
        return None


def _save(cache_file: pathlib.Path, examples: TokenizedExamples, dropped: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, input_ids=examples.input_ids, train_mask=examples.train_mask, offsets=examples.offsets,
                     dropped=np.array(json.dumps(dropped)))
        os.replace(tmp, cache_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tokenize_source(
    source,
    tokenizer,
    *,
    masking: str = "auto",
    chat_template: str | None = None,
    train_reasoning: str = "all",
    on_bad_row: str = "error",
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    encode_fn: Callable | None = None,
) -> TokenizedSource:
    """Tokenize every row of ``source`` (a SourceConfig), reading/writing the on-disk cache.

    ``encode_fn`` defaults to :func:`sftjax.data.chat.encode_example` (same signature); it must be picklable
    (a module-level function) when ``num_workers > 1``. ``num_workers=0`` picks automatically: in-process for
    small sources, one process per CPU for large ones.
    """
    from sftjax.data.chat import resolve_chat_template

    template_text = resolve_chat_template(tokenizer, chat_template)
    encoder_name = "default" if encode_fn is None else f"{encode_fn.__module__}.{encode_fn.__qualname__}"
    key = cache_key(source, tokenizer, masking=masking, chat_template=template_text, on_bad_row=on_bad_row,
                    encoder_name=encoder_name, train_reasoning=train_reasoning)
    cache_file = pathlib.Path(cache_dir or default_cache_dir()) / f"{pathlib.Path(source.path).name}-{key[:20]}.npz"
    if use_cache and cache_file.is_file():
        loaded = _load(cache_file)
        if loaded is not None:
            logger.info("%s: %d examples from the tokenization cache %s", source.path, len(loaded[0]), cache_file)
            return TokenizedSource(source.path, loaded[0], loaded[1], True, str(cache_file))

    from sftjax.data.sources import iter_rows

    rows = list(iter_rows(source))
    if num_workers == 0:
        num_workers = min(os.cpu_count() or 1, 16) if len(rows) >= PARALLEL_MIN_ROWS else 1
    encode_kwargs = {"masking": masking, "chat_template": template_text, "format": source.format,
                     "columns": dict(source.columns), "system_prompt": source.system_prompt}
    if train_reasoning != "all":  # (custom encoders without the option keep working with the default)
        encode_kwargs["train_reasoning"] = train_reasoning
    examples, dropped = _encode_rows(rows, encode_fn, tokenizer, encode_kwargs, on_bad_row, num_workers)
    if dropped:
        logger.info("%s: dropped %s", source.path, dict(sorted(dropped.items())))
    if use_cache:
        _save(cache_file, examples, dropped)
    return TokenizedSource(source.path, examples, dropped, False, str(cache_file) if use_cache else None)
