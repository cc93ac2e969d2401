"""TPU attention through jax's splash attention kernel (segment ids, causal/local masks, soft-capping).

GQA: splash's multi-query kernel serves one kv head and its group of query heads; it is vmapped over kv
heads and batch. The scale is folded into q (splash does not scale), which keeps soft-capping on the scaled
scores as in the reference. ``interpret=True`` runs the kernel in Pallas's TPU interpreter on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from pallas_kernels.attention.blocks import pad_length


@functools.lru_cache(maxsize=64)
def _kernel(length, group, causal, sliding_window, logit_softcap, block, interpret):
    """The cached splash kernel. Built under ``ensure_compile_time_eval``: splash makes its block-mask tables with
    ``jnp.array``, and built inside a trace (jit, the shard_map of the api) they would be tracers of that trace,
    kept by this cache and leaked into the next trace (UnexpectedTracerError)."""
    with jax.ensure_compile_time_eval():
        return _build_kernel(length, group, causal, sliding_window, logit_softcap, block, interpret)


def _build_kernel(length, group, causal, sliding_window, logit_softcap, block, interpret):
    shape = (length, length)
    if sliding_window is not None:
        one_head = splash_mask.LocalMask(shape, window_size=(sliding_window - 1, 0 if causal else None), offset=0)
    elif causal:
        one_head = splash_mask.CausalMask(shape)
    else:
        one_head = splash_mask.FullMask(shape)
    block_sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                    block_kv_dq=block)
    return splash.make_splash_mqa_single_device(
        splash_mask.MultiHeadMask([one_head] * group), block_sizes=block_sizes,
        attn_logits_soft_cap=logit_softcap, interpret=interpret)


def attention_splash_tpu(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, *, causal=True, sliding_window=None,
                         logit_softcap=None, scale=None, block=512, interpret=False):
    """Same contract and result as reference.attention_reference, via splash attention."""
    batch, length, num_q_heads, head_dim = q_BLHD.shape
    num_kv = k_BLKD.shape[2]
    group = num_q_heads // num_kv
    scale = head_dim ** -0.5 if scale is None else float(scale)
    block = min(block, -(-length // 128) * 128)
    padded = -(-length // block) * block
    seg = pad_length(segment_ids_BL.astype(jnp.int32), padded, value=-1)
    q = pad_length(q_BLHD, padded) * jnp.asarray(scale, q_BLHD.dtype)
    q_BKGLD = q.reshape(batch, padded, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_BKLD = jnp.swapaxes(pad_length(k_BLKD, padded), 1, 2)
    v_BKLD = jnp.swapaxes(pad_length(v_BLKD, padded), 1, 2)
    kernel = _kernel(padded, group, causal, sliding_window,
                     None if logit_softcap is None else float(logit_softcap), block, bool(interpret))

    def one_kv_head(q_GLD, k_LD, v_LD, seg_L):
        return kernel(q_GLD, k_LD, v_LD, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

    per_head = jax.vmap(one_kv_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(q_BKGLD, k_BKLD, v_BKLD, seg)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, num_q_heads, head_dim)
    return out[:, :length].astype(q_BLHD.dtype)
