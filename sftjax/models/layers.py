"""Building blocks of the decoder: Linear (with optional LoRA), RMSNorm, Embed.

Every parameter carries its logical axis names in the ``logical_axes`` metadata (e.g. ``("embed", "mlp")``);
``sftjax.sharding`` maps them to mesh axes. Kernels are stored [in, out] (the transpose of PyTorch's layout).
Each weight passes through ``gather_for_compute`` right before use: the FSDP all-gather, made explicit because
XLA mis-partitions some backward matmuls without it (see ``sftjax.sharding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sftjax.sharding import gather_for_compute


def param(value, logical_axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, logical_axes=tuple(logical_axes))


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ dropout(x) @ lora_a @ lora_b * lora_scale)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 logical_axes: tuple[str | None, str | None] = (None, None), param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.logical_axes = tuple(logical_axes)
        init = jax.nn.initializers.normal(stddev=0.02)
        self.kernel = param(init(rngs.params(), (in_features, out_features), param_dtype), self.logical_axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (self.logical_axes[1],)) if use_bias else None
        # nnx.data: these slots hold arrays/modules once enable_lora runs, so they must not be static attributes
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: nnx.Dropout | None = nnx.data(None)

    def enable_lora(self, rank: int, alpha: float, *, rslora: bool = False, dropout: float = 0.0,
                    rngs: nnx.Rngs, dtype=None) -> None:
        """Attach a PEFT-style adapter: A ~ kaiming-uniform(a=sqrt(5)) i.e. U(+-1/sqrt(in)), B = 0."""
        dtype = dtype or self.kernel[...].dtype
        bound = 1.0 / math.sqrt(self.in_features)
        a = jax.random.uniform(rngs.params(), (self.in_features, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a.astype(dtype), logical_axes=(self.logical_axes[0], None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), dtype),
                                    logical_axes=(None, self.logical_axes[1]))
        self.lora_scale = float(alpha / math.sqrt(rank) if rslora else alpha / rank)
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def merged_kernel(self):
        """kernel + lora_scale * A @ B in the kernel's dtype (the kernel itself when no adapter), as stored."""
        return self._merge(self.kernel[...], self.lora_a, self.lora_b)

    def compute_kernel(self):
        """merged_kernel() for use inside the model: every factor fsdp-gathered first (see gather_for_compute)."""
        in_axis, out_axis = self.logical_axes
        kernel = gather_for_compute(self.kernel[...], self.logical_axes)
        if self.lora_a is None:
            return kernel
        return self._merge(kernel, gather_for_compute(self.lora_a[...], (in_axis, None)),
                           gather_for_compute(self.lora_b[...], (None, out_axis)))

    def _merge(self, kernel, lora_a, lora_b):
        if lora_a is None:
            return kernel
        delta = (lora_a[...].astype(jnp.float32) @ lora_b[...].astype(jnp.float32)) * self.lora_scale
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    def __call__(self, x, *, deterministic: bool = True):
        in_axis, out_axis = self.logical_axes
        kernel = gather_for_compute(self.kernel[...].astype(x.dtype), self.logical_axes)
        leading = x.shape[:-1]
        # [..., in] -> [tokens, in]: with two leading dims XLA's CPU backend writes transposed copies of the
        # activation gradients for the weight-gradient dot (x1.2 on the CPU train step, same numbers)
        x = x.reshape(-1, x.shape[-1])
        y = jnp.dot(x, kernel)
        if self.bias is not None:
            y = y + gather_for_compute(self.bias[...].astype(x.dtype), (out_axis,))
        if self.lora_a is not None:
            h = x
            if self.lora_dropout is not None:
                h = self.lora_dropout(h, deterministic=deterministic)
            lora_a = gather_for_compute(self.lora_a[...].astype(x.dtype), (in_axis, None))
            lora_b = gather_for_compute(self.lora_b[...].astype(x.dtype), (None, out_axis))
            lora = (h @ lora_a) @ lora_b
            y = y + lora * jnp.asarray(self.lora_scale, x.dtype)
        return y.reshape(*leading, y.shape[-1])


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
