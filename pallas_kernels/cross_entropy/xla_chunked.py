"""Fused vocabulary projection + masked cross-entropy in plain XLA, never materializing [tokens, vocab].

Design: tokens are cut into blocks of ``block_t`` rows and the vocabulary into chunks of ``block_v`` columns.
The forward pass, per token block, walks the vocabulary chunks keeping a running max, running sum of
exponentials, the target's logit and the running argmax: it stores only the per-token log-sum-exp. Token blocks
with no trained token are skipped with ``lax.cond``.

The backward pass (``jax.custom_vjp``) walks vocabulary chunks in the outer loop and token blocks in the inner
loop. Each tile's softmax is recomputed from the stored log-sum-exp; the tile's logit gradient
``(softmax * (1 + 2 z lse) - onehot) * mask`` is immediately contracted into d_hidden (accumulated over chunks)
and into the chunk's d_weight columns, which are complete when the inner loop ends. Untrained token blocks are
skipped again. A vocabulary that the chunk size does not divide is handled by sliding the last chunk back to
end at V and ignoring the columns an earlier chunk already covered.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _chunk_start(chunk_index, block_v, vocab):
    """Start column of chunk ``chunk_index`` (the last one slides back so it fits) and its first new column."""
    first_new = chunk_index * block_v
    return jnp.minimum(first_new, vocab - block_v), first_new


def _tile_logits(h_TD, w_DV, logit_softcap):
    raw = jnp.einsum("td,dv->tv", h_TD, w_DV, preferred_element_type=jnp.float32)
    if logit_softcap is None:
        return raw
    return jnp.tanh(raw / logit_softcap) * logit_softcap


def _forward(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v):
    """hidden [Tp, D], targets/mask [Tp] -> (loss_sum, correct_sum, lse [Tp])."""
    num_tokens = hidden.shape[0]
    vocab = weight.shape[1]
    num_chunks = -(-vocab // block_v)

    def one_token_block(ti):
        t_start = ti * block_t
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def compute(_):
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)

            def visit(vj, carry):
                m, l, target_logit, best, best_idx = carry
                start, first_new = _chunk_start(vj, block_v, vocab)
                cols = start + jnp.arange(block_v)
                new = cols >= first_new
                logits = _tile_logits(h_blk, lax.dynamic_slice_in_dim(weight, start, block_v, axis=1),
                                      logit_softcap)
                logits_new = jnp.where(new[None], logits, -jnp.inf)
                chunk_max = logits_new.max(-1)
                chunk_arg = cols[jnp.argmax(logits_new, axis=-1)]
                m_new = jnp.maximum(m, chunk_max)
                l = l * jnp.exp(m - m_new) + jnp.exp(logits_new - m_new[:, None]).sum(-1)
                hit = (cols[None] == tgt_blk[:, None]) & new[None]
                target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
                better = chunk_max > best
                return (m_new, l, target_logit, jnp.where(better, chunk_max, best),
                        jnp.where(better, chunk_arg, best_idx))

            zeros = jnp.zeros((block_t,), jnp.float32)
            init = (jnp.full((block_t,), -jnp.inf), zeros, zeros, jnp.full((block_t,), -jnp.inf),
                    jnp.zeros((block_t,), jnp.int32))
            m, l, target_logit, _, best_idx = lax.fori_loop(0, num_chunks, visit, init)
            lse = m + jnp.log(l)
            per_token = lse - target_logit
            if z_loss:
                per_token = per_token + z_loss * jnp.square(lse)
            weight_blk = mask_blk.astype(jnp.float32)
            correct = (best_idx == tgt_blk).astype(jnp.float32)
            return jnp.sum(per_token * weight_blk), jnp.sum(correct * weight_blk), lse

        def skip(_):
            return jnp.float32(0), jnp.float32(0), jnp.zeros((block_t,), jnp.float32)

        return lax.cond(jnp.any(mask_blk != 0), compute, skip, None)

    loss, correct, lse = lax.map(one_token_block, jnp.arange(num_tokens // block_t))
    return loss.sum(), correct.sum(), lse.reshape(num_tokens)


def _backward(hidden, weight, targets, mask, lse, g_loss, logit_softcap, z_loss, block_t, block_v):
    num_tokens, hidden_dim = hidden.shape
    vocab = weight.shape[1]
    num_chunks = -(-vocab // block_v)
    low_precision = hidden.dtype != jnp.float32
    token_scale = g_loss * mask.astype(jnp.float32)

    def one_vocab_chunk(carry, vj):
        d_hidden, d_weight = carry
        start, first_new = _chunk_start(vj, block_v, vocab)
        cols = start + jnp.arange(block_v)
        new = cols >= first_new
        w_chunk = lax.dynamic_slice_in_dim(weight, start, block_v, axis=1)

        def visit(ti, inner):
            t_start = ti * block_t
            mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

            def update(inner):
                d_hidden, dw_chunk = inner
                h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
                tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)
                lse_blk = lax.dynamic_slice_in_dim(lse, t_start, block_t)
                scale_blk = lax.dynamic_slice_in_dim(token_scale, t_start, block_t)
                logits = _tile_logits(h_blk, w_chunk, logit_softcap)
                probs = jnp.exp(logits - lse_blk[:, None])
                if z_loss:
                    probs = probs * (1.0 + 2.0 * z_loss * lse_blk[:, None])
                onehot = (cols[None] == tgt_blk[:, None]).astype(jnp.float32)
                d_logits = jnp.where(new[None], (probs - onehot) * scale_blk[:, None], 0.0)
                if logit_softcap is not None:
                    d_logits = d_logits * (1.0 - jnp.square(logits / logit_softcap))
                if low_precision:
                    d_logits = d_logits.astype(hidden.dtype)
                dh_blk = lax.dynamic_slice_in_dim(d_hidden, t_start, block_t)
                dh_blk = dh_blk + jnp.einsum("tv,dv->td", d_logits, w_chunk, preferred_element_type=jnp.float32)
                dw_chunk = dw_chunk + jnp.einsum("td,tv->dv", h_blk, d_logits, preferred_element_type=jnp.float32)
                return lax.dynamic_update_slice_in_dim(d_hidden, dh_blk, t_start, axis=0), dw_chunk

            return lax.cond(jnp.any(mask_blk != 0), update, lambda c: c, inner)

        init = (d_hidden, jnp.zeros((hidden_dim, block_v), jnp.float32))
        d_hidden, dw_chunk = lax.fori_loop(0, num_tokens // block_t, visit, init)
        # Columns an earlier chunk covered got zero gradient here, so adding keeps them intact.
        old = lax.dynamic_slice_in_dim(d_weight, start, block_v, axis=1)
        d_weight = lax.dynamic_update_slice_in_dim(d_weight, old + dw_chunk.astype(d_weight.dtype), start, axis=1)
        return (d_hidden, d_weight), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, weight.dtype))
    (d_hidden, d_weight), _ = lax.scan(one_vocab_chunk, init, jnp.arange(num_chunks))
    return d_hidden.astype(hidden.dtype), d_weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v):
    loss, correct, _ = _forward(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v)
    return loss, correct


def _fused_fwd(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v):
    loss, correct, lse = _forward(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v)
    return (loss, correct), (hidden, weight, targets, mask, lse)


def _fused_bwd(logit_softcap, z_loss, block_t, block_v, residuals, cotangents):
    hidden, weight, targets, mask, lse = residuals
    g_loss, _ = cotangents
    d_hidden, d_weight = _backward(hidden, weight, targets, mask, lse, g_loss, logit_softcap, z_loss,
                                   block_t, block_v)
    return d_hidden, d_weight, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy_xla_chunked(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                                           block_t=1024, block_v=4096):
    """Same contract as reference.fused_linear_cross_entropy_reference; returns (loss_sum, token_count, correct)."""
    from pallas_kernels.cross_entropy.reference import CrossEntropyResult

    hidden_dim = hidden.shape[-1]
    vocab = weight.shape[1]
    hidden_TD = hidden.reshape(-1, hidden_dim)
    targets_T = targets.reshape(-1).astype(jnp.int32)
    mask_T = loss_mask.reshape(-1)
    num_tokens = hidden_TD.shape[0]
    block_t = max(1, min(block_t, num_tokens))
    block_v = min(block_v, vocab)
    padded = -(-num_tokens // block_t) * block_t
    if padded != num_tokens:
        extra = padded - num_tokens
        hidden_TD = jnp.pad(hidden_TD, ((0, extra), (0, 0)))
        targets_T = jnp.pad(targets_T, (0, extra))
        mask_T = jnp.pad(mask_T, (0, extra))
    loss, correct = _fused(hidden_TD, weight, targets_T, mask_T, logit_softcap, float(z_loss), block_t, block_v)
    token_count = jnp.sum(loss_mask.astype(jnp.float32))
    return CrossEntropyResult(loss_sum=loss, token_count=token_count, correct_count=lax.stop_gradient(correct))
