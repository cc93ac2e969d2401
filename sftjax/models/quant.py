"""Quantized frozen base weights (QLoRA): bitsandbytes' NF4 and LLM.int8 formats, quantized on the host,
dequantized inside the jitted step. (Quantizing a whole model, and the rules for training on top of a quantized
base, are in :mod:`sftjax.peft.quant`.)

The format is bitsandbytes' own, so that a base quantized here holds the numbers a bitsandbytes model holds:

* **NF4** (``quantize_4bit(w, blocksize=64, quant_type="nf4")``). The weight as Hugging Face stores it,
  ``[out, in]`` row-major, is flattened and cut into blocks of 64 consecutive values; each block keeps its
  float32 absmax, and each value the index of the nearest of the 16 NF4 levels of ``value / absmax``
  (nearest = ``searchsorted`` over the float32 midpoints of consecutive levels, a tie going to the lower
  level). Two 4-bit indices share a byte, the first value in the high nibble. When the element count is not a
  multiple of 64 the last block is simply shorter (its absmax is that of its own values; bitsandbytes divides
  those by the absmax where full blocks multiply by its reciprocal, and so do we), and an odd count gets a
  zero index (level 0.0) in the last low nibble. Dequantized value = ``level * absmax``, one float32 product.
* **Double quantization** (bitsandbytes' ``compress_statistics=True``): the float32 absmax vector minus its
  mean (``offset``) is itself quantized with bitsandbytes' 8-bit blockwise scheme: blocks of 256 absmax values,
  a float32 scale per block (its absmax), and an 8-bit index into the signed *dynamic* code (the 256 values of
  ``bitsandbytes.functional.create_dynamic_map()``). The index is chosen the way bitsandbytes' CPU kernel
  does: through its 65536-bin lookup table over ``[-1, 1]``, not a plain nearest-level search. Dequantized
  absmax = ``code[index] * scale + offset`` (two float32 roundings, in that order).
  The one number not reproduced bit for bit is ``offset``: bitsandbytes takes ``torch.mean`` in float32, whose
  last bit depends on torch's summation order (SIMD width, thread count); here it is the correctly rounded sum
  divided by the count. Given the same offset every stored byte and every dequantized bit are bitsandbytes'.
* **int8** (``Linear8bitLt``'s ``Int8Params``): the weight is cast to float16, and each output row keeps
  ``SCB`` = its float32 absmax and ``CB`` = ``round(w * (127 / SCB))`` as int8 (half to even; ``127 / SCB``
  rounded as torch computes it, ``(1 / SCB) * 127``). Dequantized =
  ``CB * SCB * (1/127)`` as bitsandbytes' ``int8_vectorwise_dequant`` (float32, left to right). This is a
  weight-only format here: the matmul runs in the compute dtype on the dequantized weight (bitsandbytes'
  own int8 matmul also quantizes the activations, so its outputs differ from a dense matmul; its weights don't).
  An all-zero row stores ``SCB = 0`` and zero codes (bitsandbytes would divide by zero there).

In the model (:class:`QuantizedWeight`, the ``kernel`` of a quantized ``Linear``), each stored array is a
:class:`QuantizedKernel` variable, which is not an ``nnx.Param``: no trainable filter selects it, the optimizer
never sees it, checkpoints of adapters leave it out. When the input dimension is a multiple of the block size
(every real model) blocks never straddle rows, so the codes are kept as ``[out, in / 2]`` bytes and the scales
as ``[out, in / 64]``, both with logical axes ``(out_axis, in_axis)`` of the layer: they shard exactly like the
dense ``[in, out]`` kernel would (tensor parallelism splits output rows, FSDP splits the input dimension, and
the FSDP all-gather moves 4-bit codes instead of 16-bit weights). The double-quantization scales (one float per
256 absmax values) and the offset are tiny and replicated. Otherwise (toy shapes) the arrays are flat and
replicated. The dequantization is block-wise jnp (gather the level, multiply by the block's scale) done right
before the matmul, in float32 and then cast to the compute dtype; no dense copy of the base is stored. The
matmul has its own VJP (:meth:`QuantizedWeight.matmul`): the backward dequantizes again from the stored arrays
rather than keeping each layer's dense weight from the forward (which, in a scanned model, autodiff would stack
into a dense copy of the whole base).

Training needs the float32 scales left as they are: a step that casts frozen floating-point state to a bf16
compute dtype must skip :class:`QuantizedKernel` variables (their codes are integers anyway).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftjax.sharding import gather_for_compute

FORMATS = ("nf4", "int8")
NF4_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' block size for double quantization of the NF4 absmax values

# The 16 NF4 levels (QLoRA: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero), as float32.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)


def _linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)``: a float32 step, then ``start + step * i`` for the
    first half and ``end - step * (steps - 1 - i)`` for the rest, each with a single rounding (a fused
    multiply-add in torch; exact in float64 here, then rounded)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + np.float64(step) * i
    high = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``), 256 sorted float32 values.

    Dynamic tree quantization (Dettmers, 2015): for exponents 10^-6 .. 10^0, the midpoints of 2^i + 1 evenly
    spaced points over [0.1, 1], scaled by the exponent, with both signs; then 0 and 1.
    """
    values: list[np.ndarray] = []
    for i in range(7):
        bounds = _linspace_like_torch(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        values += [scale * means, -scale * means]
    values.append(np.array([0.0, 1.0], np.float32))
    return np.sort(np.concatenate(values).astype(np.float32))


DYNAMIC_CODE = dynamic_code()


# ------------------------------------------------------------------------------------------------ host side


def _blockwise_absmax_scaled(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(absmax per block, values / absmax clipped to [-1, 1]) as bitsandbytes' reference quantizer computes them."""
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros((0,), np.float32)
    tiny = np.float32(1e-38)
    scaled = np.clip(blocks * (np.float32(1.0) / np.maximum(absmax, tiny))[:, None], -1, 1).reshape(-1)
    if n % blocksize:
        tail = flat[full:]
        tail_absmax = np.maximum(np.abs(tail).max(), tiny)
        absmax = np.concatenate([absmax, [np.abs(tail).max()]]).astype(np.float32)
        scaled = np.concatenate([scaled, np.clip(tail / tail_absmax, -1, 1)])
    return absmax.astype(np.float32), scaled.astype(np.float32)


def _quantize_4bit_codes(w_OI: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [ceil(n/2)], float32 absmax [ceil(n/blocksize)]) of the row-major flattened weight."""
    flat = np.ascontiguousarray(w_OI, dtype=np.float32).reshape(-1)
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    if scaled.size % 2:
        scaled = np.concatenate([scaled, np.zeros((1,), np.float32)])
    midpoints = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)
    index = np.searchsorted(midpoints, scaled, side="left").astype(np.uint8)
    return (index[0::2] << 4) | index[1::2], absmax


_LUT_BINS = 65536


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU lookup table: [-1, 1] in 65536 bins -> the code index chosen for that bin."""
    midpoints = np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    bins = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_BINS, dtype=np.float32)) / np.float32(_LUT_BINS - 1)
    return np.searchsorted(midpoints, bins, side="left").astype(np.uint8)  # count of midpoints below the bin


_DYNAMIC_LUT = _dynamic_lut()


def _quantize_blockwise_8bit(values: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' 8-bit blockwise quantization of a float32 vector on the CPU: (uint8 codes, float32 absmax).

    Each value times the block's float32 reciprocal absmax is mapped to a bin ``(v + 1) * 0.5 * 65535 + 0.5``
    (truncated; the kernel's last multiply-add is fused, i.e. rounded once) and the bin to its code index.
    """
    n = values.size
    blocks = -(-n // blocksize)
    padded = np.zeros((blocks * blocksize,), np.float32)
    padded[:n] = values
    grid = padded.reshape(blocks, blocksize)
    valid = (np.arange(blocks * blocksize) < n).reshape(blocks, blocksize)
    absmax = np.where(valid, np.abs(grid), 0).max(axis=1).astype(np.float32)
    inverse = np.float32(1.0) / np.where(absmax == 0, np.float32(1.0), absmax)  # a zero block stores codes 0
    scaled = np.clip(grid * inverse[:, None], -1, 1).astype(np.float32)
    half = ((scaled + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    position = (half.astype(np.float64) * (_LUT_BINS - 1) + 0.5).astype(np.float32)  # fused: one rounding
    codes = _DYNAMIC_LUT[position.astype(np.int64)]
    codes = np.where(absmax[:, None] == 0, 0, codes).astype(np.uint8)
    return codes.reshape(-1)[:n], absmax


def _mean_f32(values: np.ndarray) -> np.float32:
    """float32(sum) / count in float32, with the sum correctly rounded (torch's float32 mean, less its
    summation-order dependence)."""
    return np.float32(np.float32(np.sum(values, dtype=np.float64)) / np.float32(values.size))


def quantize_nf4(w_OI, *, double_quant: bool = False, blocksize: int = NF4_BLOCKSIZE) -> dict[str, np.ndarray]:
    """NF4-quantize one ``[out, in]`` weight (Hugging Face's layout) on the host.

    Returns ``codes`` (uint8, two 4-bit indices per byte, row-major over the flattened weight) and ``absmax``
    (float32 per block of ``blocksize``); with ``double_quant`` instead ``absmax`` = uint8 codes into
    :data:`DYNAMIC_CODE`, ``absmax_scale`` (float32 per 256 absmax values) and ``absmax_offset`` (float32 []).
    """
    w_OI = np.asarray(w_OI)
    if w_OI.ndim != 2:
        raise ValueError(f"quantize_nf4 expects a 2-D [out, in] weight, got shape {w_OI.shape}")
    codes, absmax = _quantize_4bit_codes(w_OI.astype(np.float32), blocksize)
    out = {"codes": codes, "absmax": absmax}
    if double_quant:
        offset = _mean_f32(absmax)
        absmax_codes, absmax_scale = _quantize_blockwise_8bit((absmax - offset).astype(np.float32),
                                                              ABSMAX_BLOCKSIZE)
        out.update(absmax=absmax_codes, absmax_scale=absmax_scale, absmax_offset=np.asarray(offset, np.float32))
    return out


def quantize_int8(w_OI) -> dict[str, np.ndarray]:
    """LLM.int8-quantize one ``[out, in]`` weight: ``codes`` int8 [out, in] and ``scale`` (bitsandbytes' SCB,
    float32 [out])."""
    w16 = np.asarray(w_OI).astype(np.float16).astype(np.float32)
    if w16.ndim != 2:
        raise ValueError(f"quantize_int8 expects a 2-D [out, in] weight, got shape {w16.shape}")
    scale = np.abs(w16).max(axis=1).astype(np.float32)
    # torch evaluates ``127.0 / SCB`` as ``SCB.reciprocal() * 127`` (two roundings)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = (np.float32(1.0) / scale).astype(np.float32) * np.float32(127.0)
        codes = np.round(w16 * factor[:, None])
    codes = np.where(scale[:, None] == 0, 0, codes).astype(np.int8)
    return {"codes": codes, "scale": scale}


# ------------------------------------------------------------------------------------------------ device side


def dequantize_absmax(absmax_codes, absmax_scale, absmax_offset):
    """float32 absmax from double-quantized storage (any shape; blocks of 256 over its row-major order)."""
    flat_index = jnp.arange(absmax_codes.size, dtype=jnp.int32).reshape(absmax_codes.shape)
    scaled = jnp.asarray(DYNAMIC_CODE)[absmax_codes.astype(jnp.int32)] * absmax_scale[flat_index // ABSMAX_BLOCKSIZE]
    return _rounded(scaled) + absmax_offset


def _rounded(x):
    """``x`` as it is, but opaque to floating-point contraction: XLA's CPU and GPU backends fuse ``a * b + c``
    into one multiply-add (one rounding), where bitsandbytes rounds the product first. A select on ``isnan(x)``
    (never true for these products) sits between the two and keeps them apart (``optimization_barrier`` and
    ``reduce_precision`` are simplified away before code generation)."""
    return jnp.where(jnp.isnan(x), jnp.zeros_like(x), x)


def _unpack_levels(codes):
    """uint8 [..., k] -> float32 NF4 levels [..., 2k] (high nibble first)."""
    codes = codes.astype(jnp.int32)
    index = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])
    return jnp.asarray(NF4_LEVELS)[index]


def dequantize_nf4(codes, absmax, shape_OI: tuple[int, int], *, blocksize: int = NF4_BLOCKSIZE):
    """float32 ``[out, in]`` weight from NF4 codes and float32 absmax, tiled (``[out, in/2]`` / ``[out, in/bs]``)
    or flat (``[ceil(n/2)]`` / ``[blocks]``)."""
    out_features, in_features = shape_OI
    levels = _unpack_levels(codes)
    if codes.ndim == 2:  # tiled: blocks never cross rows
        blocks = levels.reshape(out_features, in_features // blocksize, blocksize)
        return (blocks * absmax[..., None]).reshape(out_features, in_features)
    n = out_features * in_features
    levels = levels[:n]
    block_of = jnp.arange(n, dtype=jnp.int32) // blocksize
    return (levels * absmax[block_of]).reshape(out_features, in_features)


def dequantize_int8(codes, scale):
    """float32 ``[out, in]`` weight from int8 codes [out, in] and per-row scales [out]."""
    return codes.astype(jnp.float32) * scale[:, None] * jnp.float32(1.0 / 127.0)


@dataclasses.dataclass(frozen=True)
class QuantLayout:
    """What it takes to dequantize stored arrays besides the arrays: format, the ``[out, in]`` shape of one weight,
    double quantization, block size. Hashable, so it can travel as a static value next to the arrays."""

    fmt: str
    shape_OI: tuple[int, int]
    double_quant: bool = False
    blocksize: int = NF4_BLOCKSIZE

    def dequantize(self, arrays: dict[str, Any]):
        """float32 [out, in] of one weight's arrays (names as :func:`quantize_nf4` / :func:`quantize_int8`)."""
        if self.fmt == "int8":
            return dequantize_int8(arrays["codes"], arrays["scale"])
        absmax = arrays["absmax"]
        if self.double_quant:
            absmax = dequantize_absmax(absmax, arrays["absmax_scale"], arrays["absmax_offset"])
        return dequantize_nf4(arrays["codes"], absmax, self.shape_OI, blocksize=self.blocksize)

    def dequantize_stacked(self, arrays: dict[str, Any]):
        """float32 [experts, out, in] of stacked per-expert arrays (a leading expert axis on every array)."""
        return jax.vmap(self.dequantize)(arrays)


class QuantizedKernel(nnx.Variable):
    """One stored array of a quantized base weight (codes or scales). Deliberately not an ``nnx.Param``:
    trainable filters never select it, so it stays frozen and out of optimizer state and adapter checkpoints."""


class QuantizedWeight(nnx.Module):
    """A ``Linear``'s frozen kernel in NF4 or int8 (see the module docstring for layout and sharding).

    ``dequantize()`` gives the float32 weight in Hugging Face's ``[out, in]`` layout (the transpose of our
    dense kernels), fsdp-gathered like every weight right before use.
    """

    def __init__(self, arrays: dict[str, Any], *, fmt: str, in_features: int, out_features: int,
                 logical_axes: tuple[str | None, str | None], source_dtype, blocksize: int = NF4_BLOCKSIZE):
        self.fmt = fmt
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.source_dtype = jnp.dtype(source_dtype).name
        in_axis, out_axis = logical_axes
        self.double_quant = "absmax_scale" in arrays
        self.names = tuple(sorted(arrays))
        tiled = fmt == "int8" or in_features % blocksize == 0
        for name, value in arrays.items():
            value = value if isinstance(value, jax.Array) else np.asarray(value)  # traced when abstract
            if fmt == "nf4" and tiled and name in ("codes", "absmax"):
                value = value.reshape(out_features, -1)
            if name in ("absmax_scale", "absmax_offset") or not tiled:
                axes = (None,) * value.ndim  # small or flat: replicated
            else:
                axes = (out_axis, in_axis)[: value.ndim] if name != "scale" else (out_axis,)
            setattr(self, name, QuantizedKernel(jnp.asarray(value), logical_axes=axes))

    @property
    def shape_OI(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _array(self, name: str):
        variable = getattr(self, name)
        return gather_for_compute(variable[...], variable.get_metadata()["logical_axes"])

    def arrays(self) -> dict[str, Any]:
        """The stored arrays by name, fsdp-gathered."""
        return {name: self._array(name) for name in self.names}

    @property
    def layout(self) -> QuantLayout:
        return QuantLayout(self.fmt, self.shape_OI, self.double_quant, self.blocksize)

    def dequantize_arrays(self, arrays: dict[str, Any]):
        """float32 [out, in] from ``arrays`` (as :meth:`arrays` gives them)."""
        return self.layout.dequantize(arrays)

    def dequantize(self):
        """float32 [out, in]."""
        return self.dequantize_arrays(self.arrays())

    def matmul(self, x_TI):
        """``x @ W`` ([tokens, in] -> [tokens, out]) with W dequantized to ``x.dtype`` right before the dot.

        The dequantization depends only on frozen arrays, so a compiler is free to run every layer's at the start
        (and autodiff would keep each dense result from the forward until the backward): a dense base again.
        Here optimization barriers tie each dequantization to its matmul's input (forward) or output cotangent
        (backward, which keeps only the stored arrays and dequantizes again), so a layer's dense weight lives
        only while its own matmul runs. W itself gets no gradient (the base is frozen).
        """
        dequantize = self.dequantize_arrays

        @jax.custom_vjp
        def dot(x_TI, arrays):
            x_TI, arrays = jax.lax.optimization_barrier((x_TI, arrays))  # not before the input exists
            return jnp.dot(x_TI, dequantize(arrays).astype(x_TI.dtype).T)

        def forward(x_TI, arrays):
            return dot(x_TI, arrays), arrays

        def backward(arrays, g_TO):
            g_TO, arrays = jax.lax.optimization_barrier((g_TO, arrays))
            return jnp.dot(g_TO, dequantize(arrays).astype(g_TO.dtype)), None

        dot.defvjp(forward, backward)
        return dot(x_TI, self.arrays())

    def nbytes(self) -> int:
        return sum(int(getattr(self, name)[...].nbytes) for name in self.names)


def quantized_shapes(fmt: str, shape_OI: tuple[int, int], *, double_quant: bool = False,
                     blocksize: int = NF4_BLOCKSIZE) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{array name: (flat shape, dtype)} that :func:`quantize_nf4` / :func:`quantize_int8` return for a weight of
    ``shape_OI`` ([out, in])."""
    out_features, in_features = shape_OI
    if fmt == "int8":
        return {"codes": ((out_features, in_features), jnp.int8), "scale": ((out_features,), jnp.float32)}
    n = out_features * in_features
    blocks = -(-n // blocksize)
    shapes = {"codes": ((-(-n // 2),), jnp.uint8), "absmax": ((blocks,), jnp.float32)}
    if double_quant:
        shapes.update(absmax=((blocks,), jnp.uint8), absmax_scale=((-(-blocks // ABSMAX_BLOCKSIZE),), jnp.float32),
                      absmax_offset=((), jnp.float32))
    return shapes


def quantize_kernel(kernel_IO, fmt: str, *, logical_axes, double_quant: bool = False) -> QuantizedWeight:
    """A dense ``[in, out]`` kernel (ours) -> :class:`QuantizedWeight` (bitsandbytes' ``[out, in]`` format)."""
    from sftjax.sharding import to_host

    if isinstance(kernel_IO, jax.core.Tracer):  # traced (nnx.eval_shape: the abstract program): shapes only
        in_features, out_features = kernel_IO.shape
        arrays = {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in
                  quantized_shapes(fmt, (out_features, in_features), double_quant=double_quant).items()}
        return QuantizedWeight(arrays, fmt=fmt, in_features=in_features, out_features=out_features,
                               logical_axes=logical_axes, source_dtype=kernel_IO.dtype)
    host = to_host(kernel_IO)
    w_OI = np.asarray(host, dtype=np.float32).T
    arrays = quantize_nf4(w_OI, double_quant=double_quant) if fmt == "nf4" else quantize_int8(w_OI)
    return QuantizedWeight(arrays, fmt=fmt, in_features=host.shape[0], out_features=host.shape[1],
                           logical_axes=logical_axes, source_dtype=host.dtype)


# ------------------------------------------------------------------------------------------- stacked experts


class QuantizedExpertWeight(QuantizedWeight):
    """The frozen kernel of stacked MoE experts (an ``ExpertLinear``) in NF4 or int8: expert ``e``'s ``[out, in]``
    matrix (Hugging Face's layout of one expert, ``gate_up_proj[e]`` / ``down_proj[e]`` split per projection) is
    quantized as its own bitsandbytes tensor, so its blocks, absmax values and double-quantization offset are that
    expert's alone. Every stored array gets a leading expert axis (codes ``[E, out, in/2]``, absmax ``[E, out,
    in/64]``, ``absmax_scale [E, n]``, ``absmax_offset [E]``; flat per expert when ``in`` is not a multiple of 64),
    with the logical axis ``expert`` on it and nothing else split: each expert-parallel rank holds its experts'
    codes whole, and the grouped matmul dequantizes its local experts right before it runs (``moe_ops``).
    """

    def __init__(self, arrays: dict[str, Any], *, fmt: str, num_experts: int, in_features: int, out_features: int,
                 expert_axis: str | None, source_dtype, blocksize: int = NF4_BLOCKSIZE):
        self.fmt = fmt
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = blocksize
        self.source_dtype = jnp.dtype(source_dtype).name
        self.double_quant = "absmax_scale" in arrays
        self.names = tuple(sorted(arrays))
        tiled = fmt == "int8" or in_features % blocksize == 0
        for name, value in arrays.items():
            value = value if isinstance(value, jax.Array) else np.asarray(value)
            if fmt == "nf4" and tiled and name in ("codes", "absmax"):
                value = value.reshape(num_experts, out_features, -1)
            axes = (expert_axis,) + (None,) * (value.ndim - 1)
            setattr(self, name, QuantizedKernel(jnp.asarray(value), logical_axes=axes))

    def stored(self) -> dict[str, Any]:
        """The stored arrays by name, as they are (not gathered: the expert axis stays split)."""
        return {name: getattr(self, name)[...] for name in self.names}

    def dequantize_arrays(self, arrays: dict[str, Any]):
        """float32 [experts, out, in]."""
        return self.layout.dequantize_stacked(arrays)

    def dequantize(self):
        """float32 [experts, out, in] of every expert (gathered: for exports and the dense oracle)."""
        return self.dequantize_arrays(self.arrays())

    def matmul(self, x_TI):
        raise TypeError("stacked experts run through the grouped matmul (sftjax.models.moe_ops), not matmul()")


def quantize_expert_kernel(kernel_EIO, fmt: str, *, expert_axis: str | None,
                           double_quant: bool = False) -> QuantizedExpertWeight:
    """Stacked dense experts ``[E, in, out]`` (ours) -> :class:`QuantizedExpertWeight`, one bitsandbytes tensor
    per expert."""
    from sftjax.sharding import to_host

    experts, in_features, out_features = kernel_EIO.shape
    if isinstance(kernel_EIO, jax.core.Tracer):  # abstract program: shapes only
        arrays = {name: jnp.zeros((experts, *shape), dtype) for name, (shape, dtype) in
                  quantized_shapes(fmt, (out_features, in_features), double_quant=double_quant).items()}
        source_dtype = kernel_EIO.dtype
    else:
        host = to_host(kernel_EIO)
        source_dtype = host.dtype
        per_expert = []
        for e in range(experts):
            w_OI = np.asarray(host[e], dtype=np.float32).T
            per_expert.append(quantize_nf4(w_OI, double_quant=double_quant) if fmt == "nf4" else quantize_int8(w_OI))
        arrays = {name: np.stack([a[name] for a in per_expert]) for name in per_expert[0]}
    return QuantizedExpertWeight(arrays, fmt=fmt, num_experts=experts, in_features=in_features,
                                 out_features=out_features, expert_axis=expert_axis, source_dtype=source_dtype)
