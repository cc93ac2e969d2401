"""The transformers side of the family tests: the masked mean cross-entropy of a torch model's logits, and a
torch model's parameter gradients carried into our parameter layout through the checkpoint path (saved as if
they were weights, loaded by ``load_model``), so that every gradient can be compared by our parameter path."""

from __future__ import annotations

import numpy as np


def masked_cross_entropy(logits, targets, mask):
    """Mean token cross-entropy of torch ``logits`` [B, L, V] over the positions where ``mask`` is 1."""
    import torch

    vocab = logits.shape[-1]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), torch.tensor(targets).long().reshape(-1),
                                               reduction="none")
    mask_t = torch.tensor(mask, dtype=torch.float32).reshape(-1)
    return (losses * mask_t).sum() / mask_t.sum()


def gradients_in_our_layout(hf_model, make_hf_model, directory) -> dict[str, np.ndarray]:
    """``hf_model``'s ``.grad`` of every parameter, in our parameter paths: copied into a fresh model of the same
    architecture (``make_hf_model()``), saved under ``directory`` and loaded back."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from sftjax.models.loading import load_model

    carrier = make_hf_model()
    with torch.no_grad():
        for (name, parameter), (_, source) in zip(carrier.named_parameters(), hf_model.named_parameters()):
            assert source.grad is not None, name
            parameter.copy_(source.grad)
    carrier.save_pretrained(directory)
    model, _ = load_model(directory, dtype=jnp.float32)
    return flat(nnx.state(model, nnx.Param))


def flat(state) -> dict[str, np.ndarray]:
    """An nnx state as {dotted path: numpy array}."""
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
