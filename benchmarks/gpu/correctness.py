"""Stage ``correctness``: every GPU attention and fused cross-entropy implementation against the plain-jnp reference.

For each case (op, dtype, shape; ``shapes.PLAN.correctness``, in order of priority) the reference
(``pallas_kernels/*/reference.py``) runs once on the inputs upcast to float32 under
``jax.default_matmul_precision("highest")`` (XLA and Pallas use TF32 for float32 matmuls otherwise). Each
implementation then runs forward and backward on the same inputs, fresh random ones per case, with packed rows
(several segments and a padded tail) or a prompt/answer loss mask: float32 cases under "highest" too, bf16 cases
as a model runs them. Recorded: the relative error of the output and of every gradient, the bound, and ``ok`` /
``fail``. For bf16 cases the reference itself run in bf16 is recorded too: the error bf16 costs anyway.
"""

from __future__ import annotations

import contextlib
import sys

from benchmarks.gpu.common import Recorder, block_modules, short_error, time_left


def precision(dtype_name: str):
    import jax

    return jax.default_matmul_precision("highest") if dtype_name == "float32" else contextlib.nullcontext()


def attention_case(record: Recorder, dtype_name: str, shape: tuple, seed: int) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes
    from pallas_kernels.attention.reference import attention_reference

    def forward_backward(fn):
        def run(q, k, v, segment_ids, d_out):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
            return out, vjp(d_out)

        return jax.jit(run)

    batch, length, heads, kv_heads, head_dim = shape
    dtype = jnp.dtype(dtype_name)
    q = cj.random_normal(seed, (batch, length, heads, head_dim), dtype)
    k = cj.random_normal(seed + 1, (batch, length, kv_heads, head_dim), dtype)
    v = cj.random_normal(seed + 2, (batch, length, kv_heads, head_dim), dtype)
    d_out = cj.random_normal(seed + 3, q.shape, dtype)
    segments = jnp.asarray(cj.packed_segments(batch, length, seed))
    tolerance = shapes.TOLERANCE[dtype_name]
    base = {"kind": "attention", "dtype": dtype_name, "tolerance": tolerance,
            "shape": dict(batch=batch, length=length, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          segments_per_row=[int(r.max()) for r in segments])}
    upcast = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = forward_backward(attention_reference)(*upcast[:3], segments, upcast[3])
    expected = [ref_out, *ref_grads]

    def errors_of(out, grads):
        errors = [cj.relative_error(a, b) for a, b in zip([out, *grads], expected)]
        return {"rel_err_out": errors[0], "rel_err_dq_dk_dv": errors[1:],
                "status": "ok" if cj.within(errors, tolerance) else "fail"}

    if dtype_name != "float32":
        record.write({**base, "implementation": "reference", "ran_as": f"reference in {dtype_name}",
                      "note": "the oracle itself in this dtype: the error the dtype costs",
                      **errors_of(*forward_backward(attention_reference)(q, k, v, segments, d_out))})
    for name in shapes.ATTENTION_IMPLEMENTATIONS:
        fn, ran_as = cj.attention_fn(name)

        def measure(fn=fn, name=name):
            try:
                with precision(dtype_name):
                    return errors_of(*forward_backward(fn)(q, k, v, segments, d_out))
            except Exception as error:  # noqa: BLE001
                if name == "cudnn" and dtype_name == "float32":  # cuDNN's fused attention is 16-bit only
                    return {"status": "unsupported", "error": short_error(error)}
                raise

        record.attempt({**base, "implementation": name, "ran_as": ran_as}, measure,
                       needs_s=shapes.PLAN.needs_s["correctness"])


def cross_entropy_case(record: Recorder, dtype_name: str, shape: tuple, seed: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.gpu import common_jax as cj
    from benchmarks.gpu import shapes
    from pallas_kernels.cross_entropy.reference import fused_linear_cross_entropy_reference

    def loss_and_grads(fn):
        def run(hidden, weight, targets, loss_mask):
            def loss(h, w):
                result = fn(h, w, targets, loss_mask)
                return result.loss_sum, result

            (_, result), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, weight)
            return result, grads

        return jax.jit(run)

    tokens, hidden_dim, vocab = shape
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    hidden = cj.random_normal(seed, (tokens, hidden_dim), dtype)
    weight = cj.random_normal(seed + 1, (hidden_dim, vocab), dtype, scale=hidden_dim ** -0.5)
    targets = jnp.asarray(rng.integers(0, vocab, tokens), jnp.int32)
    # prompt / answer runs of random length, about half the tokens trained
    runs = np.repeat(np.arange(tokens) % 2, rng.integers(1, 64, tokens))[:tokens]
    loss_mask = jnp.asarray(runs, jnp.int32)
    tolerance = shapes.TOLERANCE[dtype_name]
    base = {"kind": "cross_entropy", "dtype": dtype_name, "tolerance": tolerance,
            "shape": dict(tokens=tokens, hidden=hidden_dim, vocab=vocab, trained=int(runs.sum()))}
    with jax.default_matmul_precision("highest"):
        ref, ref_grads = loss_and_grads(fused_linear_cross_entropy_reference)(
            hidden.astype(jnp.float32), weight.astype(jnp.float32), targets, loss_mask)

    def errors_of(result, grads):
        errors = [cj.relative_error(result.loss_sum, ref.loss_sum),
                  *(cj.relative_error(a, b) for a, b in zip(grads, ref_grads))]
        counted = float(result.token_count) == float(ref.token_count)
        return {"rel_err_loss": errors[0], "rel_err_d_hidden_d_weight": errors[1:],
                "token_count": float(result.token_count), "token_count_matches": counted,
                "correct_count_difference": float(result.correct_count) - float(ref.correct_count),
                "status": "ok" if counted and cj.within(errors, tolerance) else "fail"}

    if dtype_name != "float32":
        record.write({**base, "implementation": "reference", "ran_as": f"reference in {dtype_name}",
                      "note": "the oracle itself in this dtype: the error the dtype costs",
                      **errors_of(*loss_and_grads(fused_linear_cross_entropy_reference)(hidden, weight, targets,
                                                                                        loss_mask))})
    for name in shapes.CROSS_ENTROPY_IMPLEMENTATIONS:
        fn, ran_as = cj.cross_entropy_fn(name)

        def measure(fn=fn):
            with precision(dtype_name):
                return errors_of(*loss_and_grads(fn)(hidden, weight, targets, loss_mask))

        record.attempt({**base, "implementation": name, "ran_as": ran_as}, measure,
                       needs_s=shapes.PLAN.needs_s["correctness"])


def main() -> int:
    block_modules()
    from benchmarks.gpu import shapes

    record = Recorder("correctness.jsonl", "correctness")
    run = {"attention": attention_case, "cross_entropy": cross_entropy_case}
    for index, (op, dtype_name, shape) in enumerate(shapes.PLAN.correctness):
        if time_left() < shapes.PLAN.needs_s["correctness"]:
            record.write({"kind": op, "dtype": dtype_name, "shape": shape, "status": "skipped",
                          "reason": f"deadline: {time_left():.0f} s left"})
            continue
        try:
            run[op](record, dtype_name, shape, seed=1000 + 10 * index)
        except Exception as error:  # noqa: BLE001 - e.g. the reference itself failed: record it and go on
            record.write({"kind": op, "dtype": dtype_name, "shape": shape, "status": "error",
                          "error": short_error(error)})
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
