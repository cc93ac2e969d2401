"""The pure, jitted train and eval steps.

One optimizer step takes a batch shaped [accum, micro_rows, L] (a [rows, L] batch is one micro-batch) and:

1. scans over the ``accum`` micro-batches inside the jit, each time differentiating the *summed* masked token
   cross-entropy (``fused_linear_cross_entropy`` on the model's final hidden states and head weight) with
   respect to the trainable params only, and adding the gradients, loss sums and token counts up;
2. divides once by the trained-token count of the whole step (all micro-batches, all devices: under jit the sum
   over a sharded batch is global), so the update does not depend on micro-batching, packing or device count;
   a step with zero trained tokens gives loss 0 and gradient 0, never NaN;
3. clips the global gradient norm, applies the optax update, and keeps params/optimizer state unchanged when
   the gradient is not finite or the step trained no token (the non-finite ones are counted in the state).

Mixture-of-experts models add their router losses (``sftjax.models.moe``'s normalization rules): each micro-batch's
``MoEAux`` gives additive (sum, count) pairs of the load-balancing loss and the router z-loss; the step's objective
is ``CE_sum / T_step + lb_coef * lb_sum / N_step + z_coef * z_sum / N_step``, with T_step the trained tokens and
N_step the non-padding tokens of the whole step (both counted from the batch before the first micro-batch, over
all devices), so the aux losses too are divided once per step. Differentiated per micro-batch as
``CE_sum + (T_step / N_step) * (lb_coef * lb_sum + z_coef * z_sum)``, the one division by T_step at the end gives
exactly that objective's gradient. With one micro-batch, ``lb_sum / N_step`` is transformers'
``load_balancing_loss_func`` of the forward; with several it is their token-weighted mean. Both losses (unscaled)
and the tokens each expert received (``expert_tokens_<e>``: (token, slot) assignments summed over the MoE layers
and micro-batches) are step metrics; ``loss`` stays the cross-entropy.

The model is rebuilt inside the jit from (graphdef, trainable, frozen) with ``nnx.merge``, so the function is
pure over arrays and compiles once. Mixed precision: params (the float32 master copy) are cast to
``compute_dtype`` for the forward/backward; gradients are accumulated in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from pallas_kernels.cross_entropy.api import fused_linear_cross_entropy
from sftjax.models.quant import QuantizedKernel


@struct.dataclass
class TrainState:
    """Everything a step changes: the trainable params, their optimizer state and counters."""

    step: jax.Array
    params: Any  # nnx.State of the trainable variables
    opt_state: Any
    nonfinite_steps: jax.Array  # steps skipped because the gradient was NaN/inf

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   nonfinite_steps=jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Static settings of the loss and forward pass."""

    logit_softcap: float | None = None
    z_loss: float = 0.0
    compute_dtype: Any = jnp.float32
    cross_entropy_implementation: str | None = None
    dropout: bool = False  # run the model with deterministic=False and a fresh dropout key
    router_aux_loss_coef: float = 0.0  # MoE: coefficient of the load-balancing loss (per non-padding token)
    router_z_loss_coef: float = 0.0  # MoE: coefficient of the router z-loss (per non-padding token)


def cast_floating(tree, dtype):
    """Cast floating-point leaves of ``tree`` to ``dtype`` (integers, keys and counters untouched). The stored
    arrays of a quantized base (``QuantizedKernel``: codes and their float32 scales) keep their dtype: the
    dequantization needs the scales exactly as quantized, and casts its result to the compute dtype itself."""
    def cast(x):
        if isinstance(x, QuantizedKernel):
            return x
        if isinstance(x, nnx.Variable):
            return jax.tree.map(cast, x)
        if (isinstance(x, jax.Array) or hasattr(x, "dtype")) and jnp.issubdtype(x.dtype, jnp.floating) \
                and x.dtype != dtype:
            return x.astype(dtype)
        return x
    return jax.tree.map(cast, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def forward_loss(graphdef, trainable, frozen, batch: dict, rng, options: LossOptions, *, return_aux: bool = False):
    """Summed masked CE of one [rows, L] batch -> CrossEntropyResult (float32 sums); with ``return_aux``:
    (result, the forward's MoEAux summed over layers, None for a dense model)."""
    trainable = cast_floating(trainable, options.compute_dtype)
    frozen = cast_floating(frozen, options.compute_dtype)
    model = nnx.merge(graphdef, trainable, frozen)
    if options.dropout and rng is not None:
        # dropout layers draw from a 'dropout' stream, or 'default' when built from nnx.Rngs(seed)
        # match_shape: stacked (scanned) layers hold one key per layer, split from this step's key
        nnx.reseed(model, dropout=rng, default=jax.random.fold_in(rng, 1), policy="match_shape")
    hidden_BLD, aux = model.hidden_states(batch["tokens"], positions_BL=batch["positions"],
                                          segment_ids_BL=batch["segment_ids"], deterministic=not options.dropout,
                                          return_aux=True)
    result = fused_linear_cross_entropy(hidden_BLD, model.head_weight(), batch["targets"], batch["loss_mask"],
                                        logit_softcap=options.logit_softcap, z_loss=options.z_loss,
                                        implementation=options.cross_entropy_implementation)
    return (result, aux) if return_aux else result


def _router_sums(aux):
    """(load-balancing sum, z-loss sum, per-expert assignments [E]) of a forward's MoEAux; None without MoE."""
    if aux is None:
        return None
    lb_sum, _ = aux.load_balancing()
    z_sum, _ = aux.z_loss()
    return lb_sum, z_sum, aux.expert_counts


def _as_micro_batches(batch: dict) -> dict:
    return {k: (v[None] if v.ndim == 2 else v) for k, v in batch.items()}


def train_step_fn(graphdef, tx: optax.GradientTransformation, schedule: Callable, options: LossOptions,
                  max_grad_norm: float | None, param_shardings=None):
    """The un-jitted step ``(state, frozen, batch, rng) -> (state, metrics)``; see the module docstring.

    ``param_shardings`` (a pytree of shardings like the trainable params) pins the gradient accumulator to the
    params' layout, so the accumulator is never resharded between micro-batches. (Wrong gradients once seen with
    fsdp-sharded batches and params came from an XLA partitioner bug worked around in the layers themselves:
    see ``sftjax.sharding.gather_for_compute``.)
    """

    def constrain(tree):
        if param_shardings is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def step(state: TrainState, frozen, batch: dict, rng):
        micro = _as_micro_batches(batch)
        accum = next(iter(micro.values())).shape[0]
        # the step's trained and non-padding tokens, known before the first micro-batch (MoE aux normalization)
        trained_step = jnp.maximum(jnp.sum(micro["loss_mask"].astype(jnp.float32)), 1.0)
        real_step = jnp.maximum(jnp.sum(micro["segment_ids"] != 0, dtype=jnp.float32), 1.0)

        def summed_loss(params, one_batch, key):
            result, aux = forward_loss(graphdef, params, frozen, one_batch, key, options, return_aux=True)
            objective = result.loss_sum
            router = _router_sums(aux)
            if router is not None:
                lb_sum, z_sum, _ = router
                weighted = options.router_aux_loss_coef * lb_sum + options.router_z_loss_coef * z_sum
                objective = objective + (trained_step / real_step) * weighted
            return objective, (result, router)

        grad_fn = jax.grad(summed_loss, has_aux=True)
        zeros = constrain(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))

        def body(carry, xs):
            grads_sum, loss_sum, tokens, correct, real, router_sum = carry
            one_batch, index = xs
            grads, (result, router) = grad_fn(state.params, one_batch, jax.random.fold_in(rng, index))
            grads_sum = constrain(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, constrain(grads)))
            real = real + jnp.sum(one_batch["segment_ids"] != 0, dtype=jnp.float32)
            router_sum = None if router is None else jax.tree.map(jnp.add, router_sum, router)
            return (grads_sum, loss_sum + result.loss_sum, tokens + result.token_count,
                    correct + result.correct_count, real, router_sum), None

        router_init = jax.eval_shape(lambda: summed_loss(state.params, jax.tree.map(lambda v: v[0], micro),
                                                         rng)[1][1])
        router_init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), router_init)
        init = (zeros, *(jnp.zeros((), jnp.float32) for _ in range(4)), router_init)
        (grads_sum, loss_sum, tokens, correct, real, router_sum), _ = jax.lax.scan(
            body, init, (micro, jnp.arange(accum)))

        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads_sum)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss_sum)
        if max_grad_norm is not None:
            scale = jnp.minimum(1.0, max_grad_norm / jnp.maximum(grad_norm, 1e-12))
            grads = jax.tree.map(lambda g: g * scale, grads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        apply = finite & (tokens > 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + apply.astype(jnp.int32),
                               params=keep(new_params, state.params),
                               opt_state=keep(new_opt_state, state.opt_state),
                               nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
        metrics = {
            "loss": loss_sum / denominator,
            "trained_tokens": tokens,  # loss_mask tokens of the whole step (all micro-batches, all devices)
            "real_tokens": real,  # non-padding tokens (segment_ids != 0) of the whole step
            "correct_tokens": correct,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "skipped": (~apply).astype(jnp.int32),
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if router_sum is not None:
            lb_sum, z_sum, expert_tokens = router_sum
            metrics["router_aux_loss"] = lb_sum / real_step  # the load-balancing loss, before its coefficient
            metrics["router_z_loss"] = z_sum / real_step
            for expert in range(expert_tokens.shape[0]):
                metrics[f"expert_tokens_{expert}"] = expert_tokens[expert]
        return new_state, metrics

    return step


def make_train_step(graphdef, tx, schedule, options: LossOptions = LossOptions(), *,
                    max_grad_norm: float | None = None, donate: bool = True, param_shardings=None,
                    state_shardings=None):
    """Jitted train step; the state is donated (updated in place on device). Pass ``param_shardings``
    whenever the params are sharded (see ``train_step_fn``), and ``state_shardings`` (the TrainState's
    shardings) so the new state comes out exactly as the old one went in and the step never recompiles."""
    fn = train_step_fn(graphdef, tx, schedule, options, max_grad_norm, param_shardings)
    out_shardings = (state_shardings, None) if state_shardings is not None else None
    return jax.jit(fn, donate_argnums=(0,) if donate else (), out_shardings=out_shardings)


def make_eval_step(graphdef, options: LossOptions = LossOptions()):
    """Jitted ``(params, frozen, batch[rows, L]) -> {loss_sum, trained_tokens, correct_tokens}`` (no logits kept)."""
    options = dataclasses.replace(options, dropout=False)

    def eval_step(params, frozen, batch):
        result = forward_loss(graphdef, params, frozen, batch, None, options)
        return {"loss_sum": result.loss_sum, "trained_tokens": result.token_count,
                "correct_tokens": result.correct_count}

    return jax.jit(eval_step)
