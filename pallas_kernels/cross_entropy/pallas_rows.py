"""Fused linear cross-entropy with the row-wise softmax work in Pallas kernels (GPU via Triton; TPU).

Design (the split that GPU fused-CE kernels such as Liger's use): the big matmuls stay with the vendor
library, the memory-bound row work goes into kernels. Tokens are processed ``block_t`` at a time in an XLA
loop; for each token block the [block_t, V] logits tile is computed by a matmul, and a Pallas kernel walks it
in vocabulary chunks (online max / sum of exponentials, target logit, argmax). Only the per-token log-sum-exp
is kept. The backward recomputes each token block's logits, a second Pallas kernel turns them in place into
``(softmax * (1 + 2 z lse) - onehot) * g * mask`` (with the soft-cap derivative), and two matmuls give the
block's d_hidden and its contribution to d_weight. Memory is O(block_t * V) instead of O(tokens * V); token
blocks with no trained token are skipped with ``lax.cond``.

A vocabulary the chunk does not divide: the kernels slide the last chunk back to end at V and ignore (forward)
or rewrite identically (backward) the columns an earlier chunk covered.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.cross_entropy.reference import CrossEntropyResult


def _compiler_params(platform, interpret):
    if interpret:
        return None
    if platform == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _interpret_arg(platform, interpret):
    if not interpret:
        return False
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return True


def _softcap(raw, logit_softcap):
    return raw if logit_softcap is None else jnp.tanh(raw / logit_softcap) * logit_softcap


def _stats_kernel(logits_ref, targets_ref, lse_ref, target_logit_ref, argmax_ref, *, vocab, block_v,
                  logit_softcap):
    rows = targets_ref.shape[0]
    targets = targets_ref[...]

    def visit(vj, carry):
        m, l, target_logit, best, best_idx = carry
        first_new = vj * block_v
        start = jnp.minimum(first_new, vocab - block_v)
        logits = _softcap(logits_ref[:, pl.ds(start, block_v)].astype(jnp.float32), logit_softcap)
        cols = start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        new = cols >= first_new
        logits_new = jnp.where(new, logits, -jnp.inf)
        chunk_max = logits_new.max(axis=1)
        # First column reaching the chunk max: matches jnp.argmax's tie rule.
        chunk_arg = jnp.min(jnp.where(logits_new == chunk_max[:, None], cols, vocab), axis=1)
        m_new = jnp.maximum(m, chunk_max)
        l = l * jnp.exp(m - m_new) + jnp.exp(logits_new - m_new[:, None]).sum(axis=1)
        hit = (cols == targets[:, None]) & new
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        better = chunk_max > best
        return m_new, l, target_logit, jnp.where(better, chunk_max, best), jnp.where(better, chunk_arg, best_idx)

    neg_inf = jnp.full((rows,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((rows,), jnp.float32)
    init = (neg_inf, zeros, zeros, neg_inf, jnp.zeros((rows,), jnp.int32))
    m, l, target_logit, _, best_idx = lax.fori_loop(0, pl.cdiv(vocab, block_v), visit, init)
    lse_ref[...] = m + jnp.log(l)
    target_logit_ref[...] = target_logit
    argmax_ref[...] = best_idx


def _grad_kernel(logits_ref, targets_ref, lse_ref, row_scale_ref, d_logits_ref, *, vocab, block_v, logit_softcap,
                 z_loss):
    targets = targets_ref[...]
    lse = lse_ref[...]
    row_scale = row_scale_ref[...]

    def visit(vj, _):
        start = jnp.minimum(vj * block_v, vocab - block_v)
        raw = logits_ref[:, pl.ds(start, block_v)].astype(jnp.float32)
        logits = _softcap(raw, logit_softcap)
        cols = start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        probs = jnp.exp(logits - lse[:, None])
        if z_loss:
            probs = probs * (1.0 + 2.0 * z_loss * lse[:, None])
        d = (probs - (cols == targets[:, None]).astype(jnp.float32)) * row_scale[:, None]
        if logit_softcap is not None:
            d = d * (1.0 - jnp.square(logits / logit_softcap))
        d_logits_ref[:, pl.ds(start, block_v)] = d.astype(d_logits_ref.dtype)
        return 0

    lax.fori_loop(0, pl.cdiv(vocab, block_v), visit, 0)


def _row_stats(logits, targets, config):
    logit_softcap, z_loss, block_t, block_v, block_rows, platform, interpret = config
    tokens, vocab = logits.shape
    row_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(_stats_kernel, vocab=vocab, block_v=block_v, logit_softcap=logit_softcap),
        grid=(tokens // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, vocab), lambda i: (i, 0)), row_spec],
        out_specs=[row_spec, row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((tokens,), jnp.float32), jax.ShapeDtypeStruct((tokens,), jnp.float32),
                   jax.ShapeDtypeStruct((tokens,), jnp.int32)],
        interpret=_interpret_arg(platform, interpret),
        compiler_params=_compiler_params(platform, interpret),
        name="sftjax_ce_row_stats",
    )(logits, targets)


def _row_grads(logits, targets, lse, row_scale, out_dtype, config):
    logit_softcap, z_loss, block_t, block_v, block_rows, platform, interpret = config
    tokens, vocab = logits.shape
    row_spec = pl.BlockSpec((block_rows,), lambda i: (i,))
    tile_spec = pl.BlockSpec((block_rows, vocab), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_grad_kernel, vocab=vocab, block_v=block_v, logit_softcap=logit_softcap, z_loss=z_loss),
        grid=(tokens // block_rows,),
        in_specs=[tile_spec, row_spec, row_spec, row_spec],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct(logits.shape, out_dtype),
        interpret=_interpret_arg(platform, interpret),
        compiler_params=_compiler_params(platform, interpret),
        name="sftjax_ce_row_grads",
    )(logits, targets, lse, row_scale)


def _forward(hidden, weight, targets, mask, config):
    block_t = config[2]

    def one_block(ti):
        t_start = ti * block_t
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def compute(_):
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)
            logits = jnp.einsum("td,dv->tv", h_blk, weight, preferred_element_type=jnp.float32)
            lse, target_logit, argmax = _row_stats(logits, tgt_blk, config)
            per_token = lse - target_logit
            if config[1]:
                per_token = per_token + config[1] * jnp.square(lse)
            w = mask_blk.astype(jnp.float32)
            return jnp.sum(per_token * w), jnp.sum((argmax == tgt_blk).astype(jnp.float32) * w), lse

        def skip(_):
            return jnp.float32(0), jnp.float32(0), jnp.zeros((block_t,), jnp.float32)

        return lax.cond(jnp.any(mask_blk != 0), compute, skip, None)

    loss, correct, lse = lax.map(one_block, jnp.arange(hidden.shape[0] // block_t))
    return loss.sum(), correct.sum(), lse.reshape(-1)


def _backward(hidden, weight, targets, mask, lse, g_loss, config):
    block_t = config[2]
    row_scale = g_loss * mask.astype(jnp.float32)

    def one_block(carry, ti):
        d_weight = carry
        t_start = ti * block_t
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def compute(d_weight):
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            logits = jnp.einsum("td,dv->tv", h_blk, weight, preferred_element_type=jnp.float32)
            d_logits = _row_grads(logits, lax.dynamic_slice_in_dim(targets, t_start, block_t),
                                  lax.dynamic_slice_in_dim(lse, t_start, block_t),
                                  lax.dynamic_slice_in_dim(row_scale, t_start, block_t), hidden.dtype, config)
            dh = jnp.einsum("tv,dv->td", d_logits, weight, preferred_element_type=jnp.float32)
            dw = jnp.einsum("td,tv->dv", h_blk, d_logits, preferred_element_type=jnp.float32)
            return d_weight + dw, dh.astype(hidden.dtype)

        def skip(d_weight):
            return d_weight, jnp.zeros((block_t, hidden.shape[1]), hidden.dtype)

        return lax.cond(jnp.any(mask_blk != 0), compute, skip, d_weight)

    d_weight, dh_blocks = lax.scan(one_block, jnp.zeros(weight.shape, jnp.float32),
                                   jnp.arange(hidden.shape[0] // block_t))
    return dh_blocks.reshape(hidden.shape), d_weight.astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, weight, targets, mask, config):
    loss, correct, _ = _forward(hidden, weight, targets, mask, config)
    return loss, correct


def _fused_fwd(hidden, weight, targets, mask, config):
    loss, correct, lse = _forward(hidden, weight, targets, mask, config)
    return (loss, correct), (hidden, weight, targets, mask, lse)


def _fused_bwd(config, residuals, cotangents):
    hidden, weight, targets, mask, lse = residuals
    d_hidden, d_weight = _backward(hidden, weight, targets, mask, lse, cotangents[0], config)
    return d_hidden, d_weight, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy_pallas(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                                      platform="gpu", interpret=False, block_t=1024, block_v=1024, block_rows=16):
    """Same contract as the reference; ``platform`` 'gpu' (Triton) or 'tpu' (Mosaic), ``interpret`` for CPU."""
    hidden_dim = hidden.shape[-1]
    vocab = weight.shape[1]
    hidden_TD = hidden.reshape(-1, hidden_dim)
    targets_T = targets.reshape(-1).astype(jnp.int32)
    mask_T = loss_mask.reshape(-1)
    num_tokens = hidden_TD.shape[0]
    block_v = min(block_v, vocab)
    block_t = max(block_rows, min(block_t, -(-num_tokens // block_rows) * block_rows))
    if block_t % block_rows:
        raise ValueError(f"fused_linear_cross_entropy: block_t {block_t} must be a multiple of block_rows {block_rows}")
    padded = -(-num_tokens // block_t) * block_t
    if padded != num_tokens:
        extra = padded - num_tokens
        hidden_TD = jnp.pad(hidden_TD, ((0, extra), (0, 0)))
        targets_T = jnp.pad(targets_T, (0, extra))
        mask_T = jnp.pad(mask_T, (0, extra))
    config = (None if logit_softcap is None else float(logit_softcap), float(z_loss), block_t, block_v, block_rows,
              platform, bool(interpret))
    loss, correct = _fused(hidden_TD, weight, targets_T, mask_T, config)
    return CrossEntropyResult(loss_sum=loss, token_count=jnp.sum(loss_mask.astype(jnp.float32)),
                              correct_count=lax.stop_gradient(correct))
