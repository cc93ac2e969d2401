"""The one attention entry point used by the models."""

from __future__ import annotations

from pallas_kernels.attention.reference import attention_reference

IMPLEMENTATIONS = ("reference",)


def attention(q, k, v, segment_ids, *, causal=True, sliding_window=None, logit_softcap=None, scale=None,
              implementation=None):
    """Causal, segment-block-diagonal attention with GQA.

    q: [B, L, Hq, D]; k, v: [B, L, Hkv, D] (Hkv divides Hq); segment_ids: [B, L] int (0 = padding).
    Token i attends to token j only if they share a segment id, j <= i (causal) and i - j < sliding_window.
    Returns [B, L, Hq, D] in q's dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention: expected q [B,L,Hq,D] and k, v [B,L,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {k.shape[2]} kv heads do not divide {q.shape[2]} query heads")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"attention: segment_ids shape {segment_ids.shape} does not match q's [B, L] {q.shape[:2]}")
    implementation = implementation or "reference"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {implementation!r}; available: {IMPLEMENTATIONS}")
    return attention_reference(q, k, v, segment_ids, causal=causal, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, scale=scale)
