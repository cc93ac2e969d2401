"""Stage ``kernels``: speed of attention (forward, forward+backward) and of the fused cross-entropy.

Attention at ``shapes.PLAN.kernel_attention`` (L = 4096, 32 query / 8 kv heads, head_dim 128 then 64), bf16, for the
dense XLA reference, ``xla_chunked``, ``pallas_gpu`` and ``cudnn``, each on packed rows (several segments and a
padded tail) and on single-segment rows. Segment ids are data, so one compiled program per implementation
serves both layouts. FLOP rates are given on the (query, key) pairs the mask lets through ("visible") and on a
dense causal row ("causal_dense", comparable between layouts); forward + backward counts 3.5x the forward.

Fused linear cross-entropy at ``shapes.PLAN.kernel_ce`` (8192 tokens x hidden 4096 x vocab 128256), bf16, half the
tokens trained, for ``reference`` (full logits), ``xla_chunked`` and ``pallas_gpu``; the rate counts the
vocabulary matmul of all tokens (3x for forward + backward).

Every program is compiled ahead (``lower().compile()``: XLA's memory analysis of the same executable that is
timed); outputs of each implementation are compared with the reference's at the same shape (bf16 both).
"""

from __future__ import annotations

import sys

from benchmarks.gpu.common import Recorder, block_modules, short_error, time_left


def attention_shape(record: Recorder, shape: tuple, seed: int) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes
    from pallas_kernels.attention.reference import attention_reference

    batch, length, heads, kv_heads, head_dim = shape
    dtype = jnp.bfloat16
    q = cj.random_normal(seed, (batch, length, heads, head_dim), dtype)
    k = cj.random_normal(seed + 1, (batch, length, kv_heads, head_dim), dtype)
    v = cj.random_normal(seed + 2, (batch, length, kv_heads, head_dim), dtype)
    d_out = cj.random_normal(seed + 3, q.shape, dtype)
    layouts = {"packed": cj.packed_segments(batch, length, seed), "single": jnp.ones((batch, length), jnp.int32)}
    layouts = {name: jnp.asarray(seg, jnp.int32) for name, seg in layouts.items()}
    causal_dense = batch * length * (length + 1) // 2
    reference = {}

    for name in ("reference", *shapes.ATTENTION_IMPLEMENTATIONS):
        fn, ran_as = (attention_reference, "reference") if name == "reference" else cj.attention_fn(name)

        def forward(q, k, v, segment_ids, fn=fn):
            return fn(q, k, v, segment_ids)

        def forward_backward(q, k, v, segment_ids, d_out, fn=fn):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
            return out, vjp(d_out)

        base = {"kind": "attention", "implementation": name, "ran_as": ran_as, "dtype": "bfloat16",
                "shape": dict(batch=batch, length=length, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim)}
        compiled = {}

        def compile_both():
            seg = layouts["packed"]
            compiled["forward"] = jax.jit(forward).lower(q, k, v, seg).compile()
            compiled["forward_backward"] = jax.jit(forward_backward).lower(q, k, v, seg, d_out).compile()
            return {"compiled_memory_forward_backward": cj.compiled_memory(compiled["forward_backward"])}

        result = record.attempt({**base, "layout": "compile"}, compile_both, needs_s=shapes.PLAN.needs_s["kernel"])
        if result["status"] != "ok":
            continue
        for layout, segments in layouts.items():
            pairs = cj.visible_pairs(jax.device_get(segments))
            flops = 4 * heads * head_dim  # per visible (query, key) pair, forward (two matmuls)

            def measure(segments=segments, layout=layout, pairs=pairs):
                out, grads = compiled["forward_backward"](q, k, v, segments, d_out)
                jax.block_until_ready(grads)
                found = {"segments_per_row": [int(r.max()) for r in jax.device_get(segments)],
                         "visible_pairs": pairs}
                if name == "reference":
                    reference[layout] = (out, grads)
                elif layout in reference:
                    ref_out, ref_grads = reference[layout]
                    found["rel_err_out_vs_reference"] = cj.relative_error(out, ref_out)
                    found["rel_err_grads_vs_reference"] = [cj.relative_error(a, b) for a, b in zip(grads, ref_grads)]
                del out, grads
                timing = dict(repeats=shapes.PLAN.kernel_repeats, calls=shapes.PLAN.kernel_calls)
                fwd_ms, fwd_times = cj.time_calls(compiled["forward"], (q, k, v, segments), **timing)
                both_ms, both_times = cj.time_calls(compiled["forward_backward"], (q, k, v, segments, d_out), **timing)
                return {**found, "forward_ms": fwd_ms, "forward_times_ms": fwd_times,
                        "forward_backward_ms": both_ms, "forward_backward_times_ms": both_times,
                        "forward_tflops_visible": flops * pairs / (fwd_ms * 1e-3) / 1e12,
                        "forward_backward_tflops_visible": 3.5 * flops * pairs / (both_ms * 1e-3) / 1e12,
                        "forward_tflops_causal_dense": flops * causal_dense / (fwd_ms * 1e-3) / 1e12,
                        "forward_backward_tflops_causal_dense": 3.5 * flops * causal_dense / (both_ms * 1e-3) / 1e12}

            record.attempt({**base, "layout": layout}, measure, needs_s=2)
        compiled.clear()  # free the executables before the next implementation compiles


def cross_entropy_shape(record: Recorder, shape: tuple, seed: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes
    from pallas_kernels.cross_entropy.reference import fused_linear_cross_entropy_reference

    tokens, hidden_dim, vocab = shape
    dtype = jnp.bfloat16
    hidden = cj.random_normal(seed, (tokens, hidden_dim), dtype)
    weight = cj.random_normal(seed + 1, (hidden_dim, vocab), dtype, scale=hidden_dim ** -0.5)
    targets = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, tokens), jnp.int32)
    run = max(1, min(512, tokens // 16))  # alternating runs of prompt and answer tokens: half trained
    loss_mask = ((jnp.arange(tokens) // run) % 2).astype(jnp.int32)
    matmul_flops = 2 * tokens * hidden_dim * vocab
    reference = None
    for name in ("reference", *shapes.CROSS_ENTROPY_IMPLEMENTATIONS):
        fn, ran_as = ((fused_linear_cross_entropy_reference, "reference") if name == "reference"
                      else cj.cross_entropy_fn(name))

        def forward(h, w, t, m, fn=fn):
            return fn(h, w, t, m).loss_sum

        def forward_backward(h, w, t, m, fn=fn):
            return jax.value_and_grad(lambda h, w: fn(h, w, t, m).loss_sum, argnums=(0, 1))(h, w)

        def measure(forward=forward, forward_backward=forward_backward):
            nonlocal reference
            args = (hidden, weight, targets, loss_mask)
            fwd = jax.jit(forward).lower(*args).compile()
            both = jax.jit(forward_backward).lower(*args).compile()
            loss, grads = both(*args)
            found = {"compiled_memory_forward_backward": cj.compiled_memory(both), "loss_sum": float(loss)}
            if name == "reference":
                reference = (loss, grads)
            elif reference is not None:
                found["rel_err_loss_vs_reference"] = cj.relative_error(loss, reference[0])
                found["rel_err_grads_vs_reference"] = [cj.relative_error(a, b) for a, b in zip(grads, reference[1])]
            del loss, grads
            timing = dict(repeats=shapes.PLAN.kernel_repeats, calls=shapes.PLAN.kernel_calls)
            fwd_ms, fwd_times = cj.time_calls(fwd, args, **timing)
            both_ms, both_times = cj.time_calls(both, args, **timing)
            return {**found, "forward_ms": fwd_ms, "forward_times_ms": fwd_times, "forward_backward_ms": both_ms,
                    "forward_backward_times_ms": both_times,
                    "forward_tflops_all_tokens": matmul_flops / (fwd_ms * 1e-3) / 1e12,
                    "forward_backward_tflops_all_tokens": 3 * matmul_flops / (both_ms * 1e-3) / 1e12}

        record.attempt({"kind": "cross_entropy", "implementation": name, "ran_as": ran_as, "dtype": "bfloat16",
                        "shape": dict(tokens=tokens, hidden=hidden_dim, vocab=vocab, trained=int(loss_mask.sum()))},
                       measure, needs_s=shapes.PLAN.needs_s["kernel"])


def main() -> int:
    block_modules()
    from benchmarks.gpu import shapes

    record = Recorder("kernels.jsonl", "kernels")
    # in order of priority: attention at the first head_dim, the cross-entropy, then the other head_dims
    plan = shapes.PLAN
    work = [(attention_shape, plan.kernel_attention[0]), *((cross_entropy_shape, s) for s in plan.kernel_ce),
            *((attention_shape, s) for s in plan.kernel_attention[1:])]
    for index, (run, shape) in enumerate(work):
        if time_left() < shapes.PLAN.needs_s["kernel"]:
            record.write({"kind": run.__name__, "shape": shape, "status": "skipped",
                          "reason": f"deadline: {time_left():.0f} s left"})
            continue
        try:
            run(record, shape, seed=2000 + 10 * index)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory building the inputs
            record.write({"kind": run.__name__, "shape": shape, "status": "error", "error": short_error(error)})
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
