"""GPU attention through cuDNN's fused kernel (``jax.nn.dot_product_attention``).

cuDNN does GQA natively; segments go in as a boolean [B, 1, L, L] same-segment mask (causality and the
sliding window as its own flags). It has no logit soft-capping, so that case is refused. With
``implementation="xla"`` the same wrapper runs anywhere, which is how the mask construction is tested on CPU.
"""

from __future__ import annotations

import jax


def attention_cudnn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                    logit_softcap=None, scale=None, implementation="cudnn"):
    """Same contract and result as reference.attention_reference (no soft-capping)."""
    if logit_softcap is not None:
        raise ValueError("attention: the cudnn implementation does not support logit_softcap")
    same_segment = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    window = None
    if sliding_window is not None:
        window = (sliding_window - 1, 0 if causal else q_BLHD.shape[1])
    out = jax.nn.dot_product_attention(q_BLHD, k_BLKD, v_BLKD, mask=same_segment, scale=scale, is_causal=causal,
                                       local_window_size=window, implementation=implementation)
    return out.astype(q_BLHD.dtype)
