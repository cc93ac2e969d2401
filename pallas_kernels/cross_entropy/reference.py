"""Plain-jnp vocabulary projection and masked cross-entropy: the oracle for the fused versions."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class CrossEntropyResult(NamedTuple):
    """Sums over trained tokens (float32 scalars); normalize once per optimizer step, not per micro-batch."""

    loss_sum: jax.Array
    token_count: jax.Array
    correct_count: jax.Array


def project_logits_reference(hidden_TD, weight_DV, *, logit_softcap=None):
    """hidden [..., D] @ weight [D, V] -> float32 logits [..., V], soft-capped if asked."""
    logits = jnp.einsum("...d,dv->...v", hidden_TD, weight_DV, preferred_element_type=jnp.float32)
    if logit_softcap is not None:
        logits = jnp.tanh(logits / logit_softcap) * logit_softcap
    return logits


def fused_linear_cross_entropy_reference(hidden_TD, weight_DV, targets_T, loss_mask_T, *, logit_softcap=None,
                                         z_loss=0.0):
    """Materializes the full logits; sums cross-entropy (+ z_loss * logsumexp^2) over loss_mask."""
    logits = project_logits_reference(hidden_TD, weight_DV, logit_softcap=logit_softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_T[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_token = lse - target_logit
    if z_loss:
        per_token = per_token + z_loss * jnp.square(lse)
    mask = loss_mask_T.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets_T).astype(jnp.float32)
    return CrossEntropyResult(
        loss_sum=jnp.sum(per_token * mask),
        token_count=jnp.sum(mask),
        correct_count=jnp.sum(correct * mask),
    )
