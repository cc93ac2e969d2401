"""MXFP4 expert weights (as gpt-oss checkpoints store them), dequantized on load.

Format, in plain words: a weight ``[..., out, in]`` is cut along ``in`` into groups of 32 values. Each group is
stored as 16 bytes ``<name>_blocks [..., out, G, 16]`` (two 4-bit E2M1 codes per byte, the low nibble first)
plus one byte ``<name>_scales [..., out, G]``, a power-of-two exponent with bias 127 (E8M0). A value is
``FP4[code] * 2 ** (scale - 127)``, the 16 codes being 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. Every
such product is exact in float32 (and in bfloat16), so dequantization loses nothing.

The stacked expert tensors of gpt-oss are then laid out ``[..., in, out]`` (the checkpoint's rows are the output
features), which is what :func:`dequantize_mxfp4` returns and what ``experts.gate_up_proj`` / ``down_proj``
mean in the unquantized layout of :mod:`sftjax.models.moe_weights`.

:func:`dequantize_mxfp4_tensors` wraps a stream of ``(name, array)`` checkpoint tensors: it holds a
``_blocks`` tensor until its ``_scales`` partner arrives (or the other way round), then yields the dequantized
weight under the plain name; every other tensor passes through untouched. Fine-tuning and export work on the
dequantized weights; exports write them unquantized.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from sftjax.errors import CheckpointError

FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
GROUP_SIZE = 32
_BLOCKS, _SCALES = "_blocks", "_scales"


def dequantize_mxfp4(blocks, scales, *, dtype=np.float32, name: str = "tensor") -> np.ndarray:
    """``blocks [..., out, G, 16]`` uint8 and ``scales [..., out, G]`` uint8 -> ``[..., G * 32, out]`` in ``dtype``
    (the last two axes swapped to in, out)."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 3 or blocks.shape[-1] != GROUP_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"{name}: MXFP4 blocks {blocks.shape} and scales {scales.shape} do not fit "
                              f"(expected blocks [..., out, G, {GROUP_SIZE // 2}] and scales [..., out, G])")
    values = np.empty(blocks.shape[:-1] + (GROUP_SIZE,), np.float32)
    values[..., 0::2] = FP4_E2M1_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_E2M1_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    weight = values.reshape(scales.shape[:-1] + (scales.shape[-1] * GROUP_SIZE,))  # [..., out, in]
    return np.swapaxes(weight, -1, -2).astype(dtype)


def dequantize_mxfp4_tensors(tensors: Iterable[tuple[str, np.ndarray]], *, dtype=np.float32,
                             source: str = "checkpoint") -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint stream with each ``X_blocks`` / ``X_scales`` pair replaced by the dequantized ``X``."""
    pending: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in tensors:
        for suffix, partner in ((_BLOCKS, _SCALES), (_SCALES, _BLOCKS)):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                if base + partner in pending:
                    other = pending.pop(base + partner)[1]
                    blocks, scales = (array, other) if suffix == _BLOCKS else (other, array)
                    yield base, dequantize_mxfp4(blocks, scales, dtype=dtype, name=f"{source}: {base}")
                else:
                    pending[name] = (name, array)
                break
        else:
            yield name, array
    if pending:
        missing = sorted(pending)[0]
        partner = missing[: -len(_BLOCKS)] + _SCALES if missing.endswith(_BLOCKS) else \
            missing[: -len(_SCALES)] + _BLOCKS
        raise CheckpointError(f"{source}: MXFP4 tensor {missing} has no {partner} partner")
