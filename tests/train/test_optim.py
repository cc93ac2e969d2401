"""Optimizers and schedules against closed-form values (numpy), and the weight-decay mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sftjax.config import OptimSection
from sftjax.train.optim import decay_mask, make_optimizer, make_schedule


def section(**changes) -> OptimSection:
    return OptimSection(**changes)  # validated at construction


def test_schedules_match_closed_form():
    peak, total, warmup = 1e-3, 100, 10
    cosine = make_schedule(section(learning_rate=peak, schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.1),
                           total)
    linear = make_schedule(section(learning_rate=peak, schedule="linear", warmup_ratio=0.1), total)
    constant = make_schedule(section(learning_rate=peak, schedule="constant"), total)
    for step in (0, 5, 10, 37, 99, 100):
        if step < warmup:
            expected_cos = expected_lin = peak * step / warmup
        else:
            frac = (step - warmup) / (total - warmup)
            expected_cos = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            expected_lin = peak * (1 - frac)
        assert float(cosine(step)) == pytest.approx(expected_cos, rel=1e-5, abs=1e-12)
        assert float(linear(step)) == pytest.approx(expected_lin, rel=1e-5, abs=1e-12)
        assert float(constant(step)) == pytest.approx(peak)


def test_weight_decay_skips_norms_biases_embeddings():
    params = {"embed_tokens": {"embedding": jnp.ones((4, 2))}, "norm": {"weight": jnp.ones((2,))},
              "proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    mask = decay_mask(params, OptimSection().no_decay)
    assert mask == {"embed_tokens": {"embedding": False}, "norm": {"weight": False},
                    "proj": {"kernel": True, "bias": False}}
    lr, wd = 0.1, 0.5
    tx, _ = make_optimizer(section(learning_rate=lr, schedule="constant", weight_decay=wd), total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # numpy AdamW, first step: m_hat = g, v_hat = g^2 -> adam = g / (|g| + eps); decay only where masked in
    adam = 1.0 / (1.0 + 1e-8)
    np.testing.assert_allclose(updates["proj"]["kernel"], -lr * (adam + wd * 1.0), rtol=1e-5)  # float32 bias correction (1 - 0.999)
    for leaf in (updates["proj"]["bias"], updates["norm"]["weight"], updates["embed_tokens"]["embedding"]):
        np.testing.assert_allclose(leaf, -lr * adam, rtol=1e-5)  # float32 bias correction (1 - 0.999)


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_other_optimizers(name):
    params = {"proj": {"kernel": jnp.full((4, 4), 2.0)}}
    grads = {"proj": {"kernel": jnp.full((4, 4), 0.5)}}
    tx, _ = make_optimizer(section(name=name, learning_rate=0.1, schedule="constant", momentum=0.9), 10)
    updates, _ = tx.update(grads, tx.init(params), params)
    if name == "sgd":
        np.testing.assert_allclose(updates["proj"]["kernel"], -0.1 * 0.5)
    else:
        # adafactor's relative step scales by the parameter RMS (2.0) and normalizes the gradient to sign-ish 1
        assert np.all(np.asarray(updates["proj"]["kernel"]) < 0)
        np.testing.assert_allclose(updates["proj"]["kernel"], updates["proj"]["kernel"][0, 0])
