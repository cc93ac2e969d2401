"""The one entry point for the vocabulary projection and the training loss."""

from __future__ import annotations

from pallas_kernels.cross_entropy.reference import (
    CrossEntropyResult,
    fused_linear_cross_entropy_reference,
    project_logits_reference,
)

IMPLEMENTATIONS = ("reference",)


def project_logits(hidden, weight, *, logit_softcap=None):
    """hidden [..., D] @ weight [D, V] -> float32 logits [..., V] (used for inference/eval logits)."""
    return project_logits_reference(hidden, weight, logit_softcap=logit_softcap)


def fused_linear_cross_entropy(hidden, weight, targets, loss_mask, *, logit_softcap=None, z_loss=0.0,
                               implementation=None) -> CrossEntropyResult:
    """Summed masked cross-entropy of ``hidden @ weight`` against ``targets``.

    hidden: [..., D]; weight: [D, V]; targets, loss_mask: [...]. Returns float32 (loss_sum, token_count,
    correct_count) summed over tokens where loss_mask is nonzero.
    """
    if hidden.shape[-1] != weight.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: hidden dim {hidden.shape[-1]} != weight rows {weight.shape[0]}")
    if targets.shape != hidden.shape[:-1] or loss_mask.shape != targets.shape:
        raise ValueError(f"fused_linear_cross_entropy: targets {targets.shape} / loss_mask {loss_mask.shape} "
                         f"must match hidden's leading shape {hidden.shape[:-1]}")
    implementation = implementation or "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"fused_linear_cross_entropy: unknown implementation {implementation!r}; "
                         f"available: {IMPLEMENTATIONS}")
    return fused_linear_cross_entropy_reference(hidden, weight, targets, loss_mask, logit_softcap=logit_softcap,
                                                z_loss=z_loss)
