"""Fused vocabulary projection + masked cross-entropy in plain XLA, never materializing [tokens, vocab].

Design: first the tokens are reordered so that the trained ones (``loss_mask != 0``) come first (a stable sort
on the mask); the loops below then visit only the ``ceil(trained / block_t)`` leading token blocks, so an SFT
batch whose prompts are untrained pays for its completions only, and never for padding. Tokens are cut into
blocks of ``block_t`` rows and the vocabulary into chunks of ``block_v`` columns.

The forward pass, per token block, walks the vocabulary chunks keeping a running max, the running sum of
exponentials and the first column reaching the max (the argmax, for the accuracy count, found with two plain
reductions instead of a slow variadic argmax reduction); it stores only the per-token log-sum-exp. The target's
logit is one dot product per token with its gathered weight column, not a search through every tile.

The backward pass (``jax.custom_vjp``) walks vocabulary chunks in the outer loop and the trained token blocks in
the inner loop. Each tile's softmax is recomputed from the stored log-sum-exp; the tile's logit gradient
``(softmax * (1 + 2 z lse) - onehot) * mask`` is immediately contracted into d_hidden (accumulated over chunks)
and into the chunk's d_weight columns, which are complete when the inner loop ends; d_hidden is finally put
back into the callers' token order. A vocabulary that the chunk size does not divide is handled by sliding the
last chunk back to end at V and ignoring the columns an earlier chunk already covered.
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


def _softcap(logits, logit_softcap):
    if logit_softcap is None:
        return logits
    return jnp.tanh(logits / logit_softcap) * logit_softcap


def _tile_logits(h_TD, w_DV, logit_softcap):
    return _softcap(jnp.einsum("td,dv->tv", h_TD, w_DV, preferred_element_type=jnp.float32), logit_softcap)


def _target_logits(h_TD, weight, targets_T, logit_softcap):
    """Each token's logit of its own target: a dot product with the gathered weight column."""
    w_target_DT = jnp.take(weight, targets_T, axis=1)
    raw = jnp.einsum("td,dt->t", h_TD, w_target_DT, preferred_element_type=jnp.float32)
    return _softcap(raw, logit_softcap)


def _trained_first(mask):
    """(token order putting trained tokens first, number of token blocks holding a trained token)."""
    trained = mask != 0
    return jnp.argsort(~trained, stable=True), jnp.sum(trained.astype(jnp.int32))


def _active_blocks(trained_count, block_t):
    return (trained_count + block_t - 1) // block_t


def _forward(hidden, weight, targets, mask, num_blocks, logit_softcap, z_loss, block_t, block_v):
    """Token-sorted hidden [Tp, D], targets/mask [Tp]; only the first ``num_blocks`` token blocks are visited.
    -> (loss_sum, correct_sum, lse [Tp] (0 beyond the visited blocks))."""
    num_tokens = hidden.shape[0]
    vocab = weight.shape[1]
    num_chunks = -(-vocab // block_v)
    ragged = vocab % block_v != 0

    def one_token_block(ti, carry):
        loss_sum, correct_sum, lse_all = carry
        t_start = ti * block_t
        h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
        tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)
        mask_blk = lax.dynamic_slice_in_dim(mask, t_start, block_t)

        def visit(vj, inner):
            m, l, best_idx = inner
            start, first_new = _chunk_start(vj, block_v, vocab)
            cols = start + jnp.arange(block_v)
            logits = _tile_logits(h_blk, lax.dynamic_slice_in_dim(weight, start, block_v, axis=1), logit_softcap)
            if ragged:
                logits = jnp.where((cols >= first_new)[None], logits, -jnp.inf)
            chunk_max = logits.max(-1)
            chunk_arg = jnp.min(jnp.where(logits == chunk_max[:, None], cols[None], vocab), axis=-1)
            m_new = jnp.maximum(m, chunk_max)
            l = l * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
            # strictly greater: on a tie the earlier chunk's (smaller) column stays, as jnp.argmax does
            return m_new, l, jnp.where(chunk_max > m, chunk_arg, best_idx)

        init = (jnp.full((block_t,), -jnp.inf), jnp.zeros((block_t,), jnp.float32),
                jnp.zeros((block_t,), jnp.int32))
        m, l, best_idx = lax.fori_loop(0, num_chunks, visit, init)
        lse = m + jnp.log(l)
        per_token = lse - _target_logits(h_blk, weight, tgt_blk, logit_softcap)
        if z_loss:
            per_token = per_token + z_loss * jnp.square(lse)
        weight_blk = mask_blk.astype(jnp.float32)
        correct = (best_idx == tgt_blk).astype(jnp.float32)
        return (loss_sum + jnp.sum(per_token * weight_blk), correct_sum + jnp.sum(correct * weight_blk),
                lax.dynamic_update_slice_in_dim(lse_all, lse, t_start, axis=0))

    init = (jnp.float32(0), jnp.float32(0), jnp.zeros((num_tokens,), jnp.float32))
    return lax.fori_loop(0, num_blocks, one_token_block, init)


def _backward(hidden, weight, targets, mask, num_blocks, lse, g_loss, logit_softcap, z_loss, block_t, block_v):
    """Gradients for token-sorted inputs (see _forward); d_hidden comes back in the sorted order."""
    hidden_dim = hidden.shape[1]
    vocab = weight.shape[1]
    num_chunks = -(-vocab // block_v)
    ragged = vocab % block_v != 0
    low_precision = hidden.dtype != jnp.float32
    token_scale = g_loss * mask.astype(jnp.float32)

    def one_vocab_chunk(carry, vj):
        d_hidden, d_weight = carry
        start, first_new = _chunk_start(vj, block_v, vocab)
        cols = start + jnp.arange(block_v)
        w_chunk = lax.dynamic_slice_in_dim(weight, start, block_v, axis=1)

        def visit(ti, inner):
            d_hidden, dw_chunk = inner
            t_start = ti * block_t
            h_blk = lax.dynamic_slice_in_dim(hidden, t_start, block_t)
            tgt_blk = lax.dynamic_slice_in_dim(targets, t_start, block_t)
            lse_blk = lax.dynamic_slice_in_dim(lse, t_start, block_t)
            scale_blk = lax.dynamic_slice_in_dim(token_scale, t_start, block_t)
            logits = _tile_logits(h_blk, w_chunk, logit_softcap)
            probs = jnp.exp(logits - lse_blk[:, None])
            if z_loss:
                probs = probs * (1.0 + 2.0 * z_loss * lse_blk[:, None])
            onehot = (cols[None] == tgt_blk[:, None]).astype(jnp.float32)
            d_logits = (probs - onehot) * scale_blk[:, None]
            if ragged:
                d_logits = jnp.where((cols >= first_new)[None], d_logits, 0.0)
            if logit_softcap is not None:
                d_logits = d_logits * (1.0 - jnp.square(logits / logit_softcap))
            if low_precision:
                d_logits = d_logits.astype(hidden.dtype)
            dh_blk = lax.dynamic_slice_in_dim(d_hidden, t_start, block_t)
            dh_blk = dh_blk + jnp.einsum("tv,dv->td", d_logits, w_chunk, preferred_element_type=jnp.float32)
            dw_chunk = dw_chunk + jnp.einsum("td,tv->dv", h_blk, d_logits, preferred_element_type=jnp.float32)
            return lax.dynamic_update_slice_in_dim(d_hidden, dh_blk, t_start, axis=0), dw_chunk

        init = (d_hidden, jnp.zeros((hidden_dim, block_v), jnp.float32))
        d_hidden, dw_chunk = lax.fori_loop(0, num_blocks, visit, init)
        # Columns an earlier chunk covered got zero gradient here, so adding keeps them intact.
        old = lax.dynamic_slice_in_dim(d_weight, start, block_v, axis=1)
        d_weight = lax.dynamic_update_slice_in_dim(d_weight, old + dw_chunk.astype(d_weight.dtype), start, axis=1)
        return (d_hidden, d_weight), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, weight.dtype))
    (d_hidden, d_weight), _ = lax.scan(one_vocab_chunk, init, jnp.arange(num_chunks))
    return d_hidden.astype(hidden.dtype), d_weight


def _sorted_inputs(hidden, targets, mask, order):
    return jnp.take(hidden, order, axis=0), jnp.take(targets, order), jnp.take(mask, order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v):
    return _fused_fwd(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v)[0]


def _fused_fwd(hidden, weight, targets, mask, logit_softcap, z_loss, block_t, block_v):
    order, trained_count = _trained_first(mask)
    num_blocks = _active_blocks(trained_count, block_t)
    h_sorted, t_sorted, m_sorted = _sorted_inputs(hidden, targets, mask, order)
    loss, correct, lse = _forward(h_sorted, weight, t_sorted, m_sorted, num_blocks, logit_softcap, z_loss,
                                  block_t, block_v)
    return (loss, correct), (hidden, weight, targets, mask, order, num_blocks, lse)


def _fused_bwd(logit_softcap, z_loss, block_t, block_v, residuals, cotangents):
    hidden, weight, targets, mask, order, num_blocks, lse = residuals
    g_loss, _ = cotangents
    h_sorted, t_sorted, m_sorted = _sorted_inputs(hidden, targets, mask, order)
    d_hidden_sorted, d_weight = _backward(h_sorted, weight, t_sorted, m_sorted, num_blocks, lse, g_loss,
                                          logit_softcap, z_loss, block_t, block_v)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return jnp.take(d_hidden_sorted, inverse, axis=0), d_weight, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_linear_cross_entropy_xla_chunked(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                                           block_t=256, block_v=4096):
    """Same contract as reference.fused_linear_cross_entropy_reference; returns (loss_sum, token_count, correct).

    Cost scales with the number of trained tokens (rounded up to ``block_t``), not with all tokens.
    """
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
