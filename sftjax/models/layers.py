"""Building blocks of the decoder: Linear (with optional LoRA), RMSNorm, Embed.

Every parameter carries its logical axis names in the ``logical_axes`` metadata (e.g. ``("embed", "mlp")``);
``sftjax.sharding`` maps them to mesh axes. Kernels are stored [in, out] (the transpose of PyTorch's layout).
Each weight passes through ``gather_for_compute`` right before use: the FSDP all-gather, made explicit because
XLA mis-partitions some backward matmuls without it (see ``sftjax.sharding``).

A ``Linear`` may hold a quantized frozen kernel instead (``quantize``: NF4 or int8 in bitsandbytes' format, see
``sftjax.models.quant``), dequantized right before its matmul, and a DoRA adapter (``use_dora``), following peft.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.errors import ConfigError
from sftjax.models.quant import QuantizedWeight, quantize_kernel
from sftjax.sharding import gather_for_compute


def param(value, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ dropout(x) @ lora_a @ lora_b * lora_scale), or the DoRA form of it.

    DoRA (``enable_lora(..., use_dora=True)``, as peft's ``DoraLinearLayer``): a trained magnitude ``m`` [out]
    rescales each output column of ``W + scale * A @ B``: ``y = m / ||W + scale * A @ B|| * (x @ W + scale * x @ A
    @ B)`` with the column norm (peft's per-row norm of its ``[out, in]`` weight) treated as a constant (no gradient,
    the DoRA paper's section 4.3 and peft's ``weight_norm.detach()``). With LoRA dropout active, peft applies the
    magnitude to the dropped-out input's path: ``y = x @ W + (m / ||.|| - 1) * (d(x) @ W) + m / ||.|| * scale *
    d(x) @ A @ B``; so does this layer. ``m`` starts at the column norms, so the adapted layer starts equal to
    the base.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 logical_axes: tuple[str | None, str | None] = (None, None), param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.logical_axes = tuple(logical_axes)
        init = jax.nn.initializers.normal(stddev=0.02)
        # an nnx.Param [in, out], or a QuantizedWeight (frozen codes + scales) once ``quantize`` ran
        self.kernel = param(init(rngs.params(), (in_features, out_features), param_dtype), self.logical_axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (self.logical_axes[1],)) if use_bias else None
        # nnx.data: these slots hold arrays/modules once enable_lora runs, so they must not be static attributes
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_magnitude: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)

    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedWeight)

    @property
    def kernel_dtype(self):
        return jnp.dtype(self.kernel.source_dtype) if self.quantized else self.kernel[...].dtype

    def quantize(self, fmt: str, *, double_quant: bool = False) -> None:
        """Replace the dense kernel by its ``fmt`` (nf4 | int8) quantization (see ``sftjax.models.quant``)."""
        self.kernel = quantize_kernel(self.kernel[...], fmt, logical_axes=self.logical_axes,
                                      double_quant=double_quant)

    def base_kernel(self, dtype=jnp.float32):
        """The frozen kernel [in, out] in ``dtype`` (dequantized if quantized), fsdp-gathered."""
        if self.quantized:
            return self.kernel.dequantize().astype(dtype).T
        return gather_for_compute(self.kernel[...].astype(dtype), self.logical_axes)

    def enable_lora(self, rank: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                    rngs: nnx.Rngs, dtype=None, init: str = "default", use_dora: bool = False,
                    name: str = "linear") -> None:
        """Attach a PEFT-style adapter initialized by ``init`` (see ``sftjax.peft.init``; ``default``: A ~
        kaiming-uniform(a=sqrt(5)) i.e. U(+-1/sqrt(in)), B = 0). PiSSA/OLoRA replace the kernel by their residual
        ``W - scale * A @ B`` (computed on the dense kernel: quantize after). ``use_dora`` adds DoRA's magnitude."""
        from sftjax.peft.init import RESIDUAL_INITS, lora_init

        dtype = dtype or self.kernel_dtype
        scale = float(alpha / math.sqrt(rank) if rslora else alpha / rank)
        if init in RESIDUAL_INITS and self.quantized:
            raise ConfigError(f"lora.init={init} on the quantized {name}: the residual must be computed on the "
                              "full-precision weight; initialize the adapters first, then quantize")
        kernel = self.kernel[...] if init in RESIDUAL_INITS else jax.ShapeDtypeStruct(
            (self.in_features, self.out_features), self.kernel_dtype)
        a, b, residual = lora_init(init, kernel, rank, scale, key=rngs.params(), name=name)
        if residual is not None:
            self.kernel[...] = residual.astype(self.kernel_dtype)
        self.lora_a = nnx.LoRAParam(a.astype(dtype), logical_axes=(self.logical_axes[0], None))
        self.lora_b = nnx.LoRAParam(b.astype(dtype), logical_axes=(None, self.logical_axes[1]))
        self.lora_scale = scale
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        if use_dora:
            self.enable_dora(dtype=dtype)

    def enable_dora(self, *, dtype=None) -> None:
        """DoRA's magnitude on the current adapter: ``m = ||W + scale * A @ B||`` per output column (float32, the
        dequantized weight when quantized), as peft's ``DoraLinearLayer.update_layer``."""
        if self.lora_a is None:
            raise ValueError("enable_dora needs a LoRA adapter (enable_lora first)")
        dtype = dtype or self.lora_a[...].dtype
        weight = self.base_kernel(jnp.float32) + self._delta(self.lora_a[...], self.lora_b[...], jnp.float32)
        self.lora_magnitude = nnx.LoRAParam(_column_norm(weight).astype(dtype), logical_axes=(self.logical_axes[1],))

    def _delta(self, lora_a, lora_b, dtype):
        return (lora_a.astype(dtype) @ lora_b.astype(dtype)) * jnp.asarray(self.lora_scale, dtype)

    def merged_kernel(self):
        """The adapted kernel [in, out] as stored: ``W + scale * A @ B`` (LoRA) or ``m / ||W + scale * A @ B|| *
        (W + scale * A @ B)`` (DoRA, peft's merge), computed in float32 and returned in the kernel's dtype
        (float32 for a quantized kernel, which is dequantized); the kernel itself when no adapter."""
        if self.quantized:
            kernel = self.kernel.dequantize().T
        else:
            kernel = self.kernel[...]
        magnitude = None if self.lora_magnitude is None else self.lora_magnitude[...]
        return self._merge(kernel, self.lora_a, self.lora_b, magnitude)

    def compute_kernel(self):
        """merged_kernel() for use inside the model: every factor fsdp-gathered first (see gather_for_compute)."""
        in_axis, out_axis = self.logical_axes
        kernel = self.kernel.dequantize().T if self.quantized else gather_for_compute(self.kernel[...],
                                                                                      self.logical_axes)
        if self.lora_a is None:
            return kernel
        magnitude = None if self.lora_magnitude is None else gather_for_compute(self.lora_magnitude[...],
                                                                                (out_axis,))
        return self._merge(kernel, gather_for_compute(self.lora_a[...], (in_axis, None)),
                           gather_for_compute(self.lora_b[...], (None, out_axis)), magnitude)

    def _merge(self, kernel, lora_a, lora_b, magnitude=None):
        if lora_a is None:
            return kernel
        weight = kernel.astype(jnp.float32) + self._delta(lora_a[...], lora_b[...], jnp.float32)
        if magnitude is not None:
            weight = weight * (magnitude.astype(jnp.float32) / jax.lax.stop_gradient(_column_norm(weight)))
        return weight.astype(kernel.dtype)

    def fold_adapter(self) -> bool:
        """Fold the adapter (LoRA or DoRA) into a dense kernel in place and drop it; a quantized kernel becomes a
        dense ``nnx.Param`` in the dtype it was quantized from. Returns whether there was an adapter."""
        if self.lora_a is None:
            return False
        merged = self.merged_kernel()
        if self.quantized:
            self.kernel = param(merged.astype(self.kernel_dtype), self.logical_axes)
        else:
            self.kernel[...] = merged
        self.lora_a = self.lora_b = self.lora_magnitude = None
        return True

    def __call__(self, x, *, deterministic: bool = True):
        in_axis, out_axis = self.logical_axes
        leading = x.shape[:-1]
        # [..., in] -> [tokens, in]: with two leading dims XLA's CPU backend writes transposed copies of the
        # activation gradients for the weight-gradient dot (x1.2 on the CPU train step, same numbers)
        x = x.reshape(-1, x.shape[-1])
        if self.quantized:  # dequantized inside the (rematerialized) matmul
            matmul = self.kernel.matmul
        else:
            kernel = self.base_kernel(x.dtype)

            def matmul(h):
                return jnp.dot(h, kernel)
        base = matmul(x)
        y = base
        if self.bias is not None:
            y = y + gather_for_compute(self.bias[...].astype(x.dtype), (out_axis,))
        if self.lora_a is not None:
            dropped = self.lora_dropout is not None and not deterministic
            h = self.lora_dropout(x, deterministic=deterministic) if dropped else x
            lora_a = gather_for_compute(self.lora_a[...].astype(x.dtype), (in_axis, None))
            lora_b = gather_for_compute(self.lora_b[...].astype(x.dtype), (None, out_axis))
            lora = (h @ lora_a) @ lora_b
            scale = jnp.asarray(self.lora_scale, x.dtype)
            if self.lora_magnitude is None:
                y = y + lora * scale
            else:
                magnitude = gather_for_compute(self.lora_magnitude[...].astype(x.dtype), (out_axis,))
                weight = self.base_kernel(x.dtype) if self.quantized else kernel
                norm = jax.lax.stop_gradient(_column_norm(weight + scale * (lora_a @ lora_b)))
                mag_norm_scale = magnitude / norm
                base_h = matmul(h) if dropped else base
                y = y + ((mag_norm_scale - 1) * base_h + mag_norm_scale * lora * scale)
        return y.reshape(*leading, y.shape[-1])


def _column_norm(weight_IO):
    """L2 norm of each output column of an [in, out] kernel (peft's per-row norm of its [out, in] weight)."""
    return jnp.sqrt(jnp.sum(jnp.square(weight_IO), axis=0))


class Constant(nnx.Variable):
    """A stored value the model reads but never trains (not an ``nnx.Param``): Gemma 4's per-layer scalar."""


def rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, statistics in float32, no weight (Gemma 4's value norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, or * (1 + w) when ``plus_one`` (Gemma); statistics in float32 like transformers."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool = False, logical_axis: str = "norm",
                 param_dtype=jnp.float32):
        self.eps = eps
        self.plus_one = plus_one
        self.logical_axis = logical_axis
        init_value = jnp.zeros((dim,), param_dtype) if plus_one else jnp.ones((dim,), param_dtype)
        self.weight = param(init_value, (logical_axis,))

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = gather_for_compute(self.weight[...], (self.logical_axis,))
        if self.plus_one:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(dtype)
        return weight.astype(dtype) * normed.astype(dtype)


class Embed(nnx.Module):
    """Token embedding table [V, D]; the lookup is optionally scaled (Gemma multiplies by sqrt(D))."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=0.02)
        self.embedding = param(init(rngs.params(), (vocab_size, dim), param_dtype), ("vocab", "embed"))

    def __call__(self, tokens_BL, *, dtype=None, scale: float | None = None):
        table = gather_for_compute(self.embedding[...], ("vocab", "embed"))
        x = jnp.take(table, tokens_BL, axis=0)
        if dtype is not None:
            x = x.astype(dtype)
        if scale is not None:
            x = x * jnp.asarray(scale, x.dtype)
        return x
