"""Model FLOPs per trained token and device peak FLOP/s, for MFU.

A CPU has no datasheet peak, and a matmul timed once at start-up reads low on a loaded machine (an MFU above 0.9
was reported that way). So training reports MFU on a CPU only when ``train.peak_flops`` is set;
:func:`calibrated_cpu_flops` (used by ``sftjax plan`` for CPU step-time estimates) takes the best of many
repetitions of a larger matmul and caches the result per CPU model and jax version, so it is measured once per
machine, not per run.

Model FLOPs follow the usual convention (PaLM appendix B): per token, 2N for the forward matmuls, 2N for the
backward input gradients and 2N_trainable for the weight gradients (N = parameters that take part in matmuls,
head included, embedding lookup excluded; with LoRA only the adapters get weight gradients), plus the attention
scores and values: 12 * layers * heads * head_dim * seq_len (forward + backward, causal mask not discounted).
MFU = model FLOPs per second / (device count * peak FLOP/s per device).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from sftjax.accelerators import chip_for_device_kind

def matmul_flops_per_token(num_matmul_params: int, num_trainable_matmul_params: int) -> float:
    return 4.0 * num_matmul_params + 2.0 * num_trainable_matmul_params


def attention_flops_per_token(num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    return 12.0 * num_layers * num_heads * head_dim * seq_len


def inactive_expert_params(model_config) -> int:
    """Parameters a token does not use: per MoE layer, the E - k experts it is not routed to (0 without MoE)."""
    moe = getattr(model_config, "moe", None)
    if moe is None:
        return 0
    per_expert = 3 * moe.hidden_size * moe.expert_intermediate_size
    if moe.expert_bias:
        per_expert += 2 * moe.expert_intermediate_size + moe.hidden_size
    return len(model_config.moe_layers) * (moe.num_experts - moe.num_experts_per_tok) * per_expert


def model_flops_per_token(model_config, *, num_params: int, num_trainable_params: int, seq_len: int) -> float:
    """Training FLOPs per token for a decoder with ``num_params`` parameters (embedding table included); an MoE
    model's experts count k of E per token."""
    embed = model_config.vocab_size * model_config.hidden_size
    head = embed if model_config.tie_word_embeddings else 0  # tied head: the table is also a matmul
    matmul = max(num_params - embed + head - inactive_expert_params(model_config), 0)
    trainable = min(num_trainable_params, matmul)
    # full and sliding layers may differ in head_dim (Gemma 4): the layers' mean gives their summed attention FLOPs
    layer_configs = [model_config.for_layer_type(model_config.layer_type(i)) for i in range(model_config.num_layers)]
    head_dim = sum(c.head_dim for c in layer_configs) / max(len(layer_configs), 1)
    return (matmul_flops_per_token(matmul, trainable)
            + attention_flops_per_token(model_config.num_layers, model_config.num_heads, head_dim, seq_len))


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SFTJAX_CACHE_DIR", pathlib.Path.home() / ".cache" / "sftjax")) / "cpu_peak.json"


def _measure_cpu_flops(size: int, repeats: int) -> float:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32))
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


@functools.lru_cache(maxsize=None)
def calibrated_cpu_flops(size: int = 1024, repeats: int = 20) -> float:
    """Float32 matmul FLOP/s of one CPU device: the best of ``repeats`` timed [size, size] products (the fastest
    repetition is the one least disturbed by other load), cached in ``~/.cache/sftjax/cpu_peak.json`` per CPU
    model, core count, device count and jax version."""
    key = f"{_cpu_model()}|{os.cpu_count()}|{jax.device_count()}|{jax.__version__}|{size}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    value = _measure_cpu_flops(size, repeats)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**cached, key: value}, indent=1))
    except OSError:  # a read-only home: measured again next time
        pass
    return value


def device_peak_flops(device=None) -> float | None:
    """Peak FLOP/s of one device from the datasheet table; None for a CPU (no datasheet peak; see the module
    docstring) or an unknown accelerator."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    chip = chip_for_device_kind(device.device_kind)
    return chip.peak_bf16_flops if chip is not None else None
