"""The one generic decoder-only transformer; families differ only by ModelConfig switches.

Block layout (pre-norm residual):  h += [attn_out_norm](attn(attn_norm(h)));  h += [mlp_out_norm](mlp(mlp_norm(h)))
where the bracketed "sandwich" norms exist only for Gemma2-style configs (Gemma 4 then multiplies the layer's
output by a stored scalar; its MoE layers run the dense MLP as the MoE block's shared expert, see
:mod:`sftjax.models.moe`). Gemma 3/4 give full and sliding layers their own RoPE (and Gemma 4 its own head shape,
values from k_proj and value norms): each layer takes its kind's cos/sin from per-type tables. Attention is causal
and block-diagonal over ``segment_ids`` (packed examples never see each other), through
``pallas_kernels.attention`` with the implementation the Decoder holds (``attention_implementation``: a static
field, so a change retraces; None picks the best for the backend); the logits go through
``pallas_kernels.cross_entropy.project_logits`` so training can fuse the head with the loss instead. There is no
dropout in the base model (SFT does not use it); LoRA adapters bring their own.

Gemma 4's small models add two switches. Per-layer inputs (``per_layer_input_size``): a second token embedding,
one slice per layer, mixed with a projection of the main embedding (:class:`PerLayerEmbedding`), gates each
layer's residual stream on its way out (:class:`PerLayerInput`). Key/value sharing (``kv_shared_layers``): the last
layers have no k/v projections and attend over the keys/values of the last earlier layer of their kind, in the
training forward (passed along the layer loop) and in decode mode (that layer's cache).

Generation uses the same layers in decode mode: ``Decoder.decode(tokens_BT, positions_BT, cache)`` runs the
tokens at the given positions, writes their keys/values into the cache (``init_cache``: per layer [B, S, Hkv, D])
and attends over it (``pallas_kernels.attention.cached``). The block code (norms, residuals, MLP) is shared with
the training forward; only the attention call differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.attention.api import attention
from pallas_kernels.attention.cached import attention_over_cache, write_cache
from pallas_kernels.cross_entropy.api import project_logits
from sftjax.models.config import ModelConfig
from sftjax.models.layers import Constant, Embed, Linear, RMSNorm, param, rms_normalize
from sftjax.models.moe import MoE, MoEAux
from sftjax.models.rope import apply_rope, rope_cos_sin
from sftjax.models.scan import run_scanned
from sftjax.errors import ConfigError
from sftjax.models.config import FULL_ATTENTION, REMAT_POLICIES
from sftjax.sharding import gather_for_compute

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def with_moe_overrides(config: ModelConfig, overrides: dict) -> ModelConfig:
    """``config`` with run-time MoE switches (``model.moe`` of a run config) applied; a one-line error when the
    model has no MoE block."""
    if not overrides:
        return config
    if config.moe is None:
        raise ConfigError(f"model.moe={dict(overrides)!r} is set but {config.architecture} has no MoE layers")
    return config.replace(moe=config.moe.replace(**overrides))


def remat_policy(name: str):
    """The jax.checkpoint policy of a remat setting: 'full' saves nothing (recompute the layer), 'save_dots' keeps
    the matmul outputs, 'offload_dots' keeps them in pinned host memory (needs a backend with that memory kind)."""
    if name == "full":
        return None
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            raise ConfigError(f"model.remat=offload_dots needs pinned host memory, which the {jax.default_backend()} "
                              f"backend does not offer (memory kinds: {sorted(kinds)}); use save_dots or full")
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat {name!r} not in {REMAT_POLICIES}")


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs,
                 implementation: str | None = None):
        self.layer_type = config.layer_type(layer_index)
        c = config.for_layer_type(self.layer_type)  # this kind of layer's head shape (Gemma 4) and RoPE
        self.implementation = implementation  # pallas_kernels.attention implementation; None = automatic
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.sliding_window = config.sliding_window_for_layer(layer_index)
        self.v_norm_eps = c.rms_norm_eps if c.v_norm else None
        self.kv_source = config.kv_source(layer_index)  # a layer reusing another's keys/values has no k/v weights
        shared = self.kv_source is not None
        k_eq_v = c.attention_k_eq_v and self.layer_type == FULL_ATTENTION
        self.softcap = c.attn_logit_softcap
        self.scale = c.attention_scale
        pd = jnp.dtype(c.param_dtype)
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = Linear(c.hidden_size, q_dim, use_bias=c.attention_bias, logical_axes=("embed", "heads"),
                             param_dtype=pd, rngs=rngs)
        self.k_proj = None if shared else Linear(c.hidden_size, kv_dim, use_bias=c.attention_bias,
                                                 logical_axes=("embed", "kv_heads"), param_dtype=pd, rngs=rngs)
        self.v_proj = None if k_eq_v or shared else Linear(c.hidden_size, kv_dim, use_bias=c.attention_bias,
                                                 logical_axes=("embed", "kv_heads"), param_dtype=pd, rngs=rngs)
        self.o_proj = Linear(q_dim, c.hidden_size, use_bias=c.attention_out_bias, logical_axes=("heads", "embed"),
                             param_dtype=pd, rngs=rngs)
        # sink logits [num_heads]: join each softmax with no value, so a head may attend to nothing (gpt-oss)
        self.sinks = param(jnp.zeros((c.num_heads,), pd), ("heads",)) if c.attention_sinks else None
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, logical_axis="head_dim",
                                  param_dtype=pd)
            self.k_norm = None if shared else RMSNorm(c.head_dim, eps=c.rms_norm_eps, plus_one=c.norm_plus_one,
                                                      logical_axis="head_dim", param_dtype=pd)
        else:
            self.q_norm = None
            self.k_norm = None

    def _qkv(self, x_BLD, cos_BLR, sin_BLR, deterministic, shared_kv=None):
        """(q, k, v), q and k rotated; ``shared_kv``: the (k, v) of the layer this one reuses them from."""
        batch, length, _ = x_BLD.shape
        if isinstance(cos_BLR, dict):  # one RoPE table per layer type (Gemma 3/4)
            cos_BLR, sin_BLR = cos_BLR[self.layer_type], sin_BLR[self.layer_type]
        q = self.q_proj(x_BLD, deterministic=deterministic).reshape(batch, length, self.num_heads, self.head_dim)
        if self.kv_source is not None:  # keys and values come normed and rotated from their own layer
            q = q if self.q_norm is None else self.q_norm(q)
            return (apply_rope(q, cos_BLR, sin_BLR), *(shared_kv or (None, None)))
        k = self.k_proj(x_BLD, deterministic=deterministic).reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(x_BLD, deterministic=deterministic).reshape(
            batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm_eps is not None:
            v = rms_normalize(v, self.v_norm_eps)
        return apply_rope(q, cos_BLR, sin_BLR), apply_rope(k, cos_BLR, sin_BLR), v

    def _sinks(self):
        return None if self.sinks is None else gather_for_compute(self.sinks[...], ("heads",))

    def _out(self, out_BLHD, deterministic):
        batch, length = out_BLHD.shape[:2]
        return self.o_proj(out_BLHD.reshape(batch, length, -1), deterministic=deterministic)

    def __call__(self, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, *, deterministic: bool = True):
        return self.attend(x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic=deterministic)[0]

    def attend(self, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, *, deterministic: bool = True, shared_kv=None):
        """(output, (k, v)): the keys/values this layer attended over, for the layers that reuse them."""
        q, k, v = self._qkv(x_BLD, cos_BLR, sin_BLR, deterministic, shared_kv)
        out = attention(q, k, v, segment_ids_BL, causal=True, sliding_window=self.sliding_window,
                        logit_softcap=self.softcap, scale=self.scale, sinks=self._sinks(),
                        implementation=self.implementation)
        return self._out(out, deterministic), (k, v)

    def decode(self, x_BTD, cos_BTR, sin_BTR, positions_BT, cache, shared_cache=None):
        """Decode mode: write this chunk's keys/values at ``positions_BT`` and attend over the cache (a layer that
        reuses another's keys/values attends over that layer's cache, ``shared_cache``, and keeps its own)."""
        if self.kv_source is not None:
            q = self._qkv(x_BTD, cos_BTR, sin_BTR, True)[0]
            k_cache, v_cache = shared_cache
            out = attention_over_cache(q, k_cache, v_cache, positions_BT, sliding_window=self.sliding_window,
                                       logit_softcap=self.softcap, scale=self.scale, sinks=self._sinks())
            return self._out(out, True), cache
        q, k, v = self._qkv(x_BTD, cos_BTR, sin_BTR, True)
        k_cache, v_cache = cache
        start_B = positions_BT[:, 0]
        k_cache, v_cache = write_cache(k_cache, k, start_B), write_cache(v_cache, v, start_B)
        out = attention_over_cache(q, k_cache, v_cache, positions_BT, sliding_window=self.sliding_window,
                                   logit_softcap=self.softcap, scale=self.scale, sinks=self._sinks())
        return self._out(out, True), (k_cache, v_cache)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) (SwiGLU / GeGLU)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, width: int | None = None):
        c = config.replace(intermediate_size=width) if width else config
        pd = jnp.dtype(c.param_dtype)
        self.activation = c.activation
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, logical_axes=("embed", "mlp"),
                                param_dtype=pd, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, logical_axes=("embed", "mlp"),
                              param_dtype=pd, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias, logical_axes=("mlp", "embed"),
                                param_dtype=pd, rngs=rngs)

    def __call__(self, x_BLD, *, deterministic: bool = True):
        gate = _ACTIVATIONS[self.activation](self.gate_proj(x_BLD, deterministic=deterministic))
        return self.down_proj(gate * self.up_proj(x_BLD, deterministic=deterministic), deterministic=deterministic)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs,
                 attention_implementation: str | None = None):
        c = config
        pd = jnp.dtype(c.param_dtype)

        def norm():
            return RMSNorm(c.hidden_size, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, param_dtype=pd)

        self.attn_norm = norm()
        self.attn = Attention(c, layer_index, rngs=rngs, implementation=attention_implementation)
        self.attn_out_norm = norm() if c.sandwich_norms else None
        moe_layer = c.is_moe_layer(layer_index)
        # Gemma 4's MoE block norms its own inputs (branch_norms): it takes the residual stream itself
        self.mlp_norm = None if moe_layer and c.moe.branch_norms else norm()
        # the MoE block where the config says so (mlp_only_layers, decoder_sparse_step), else the dense MLP
        self.mlp = (MoE(c.moe, param_dtype=pd, rngs=rngs) if moe_layer
                    else MLP(c, rngs=rngs, width=c.mlp_width(layer_index)))
        self.mlp_out_norm = norm() if c.sandwich_norms else None
        self.num_experts = c.moe.num_experts if c.moe is not None else 0  # of the model (0: a dense model)
        self.layer_scalar = Constant(jnp.ones((1,), pd), logical_axes=(None,)) if c.layer_scalar else None
        # Gemma 4's per-layer input: gated by the residual stream, projected back
        self.per_layer = PerLayerInput(c, rngs=rngs) if c.per_layer_input_size else None

    def _feed_forward(self, x_BLD, segment_ids_BL, deterministic):
        """(output, MoEAux): the router statistics of an MoE layer, zeros for a dense layer of an MoE model, None
        in a dense model."""
        if isinstance(self.mlp, MoE):
            return self.mlp(x_BLD, segment_ids_BL, deterministic=deterministic)
        aux = MoEAux.zeros(self.num_experts) if self.num_experts else None
        return self.mlp(x_BLD, deterministic=deterministic), aux

    def _block(self, x_BLD, attend, deterministic, segment_ids_BL=None, per_layer_BLP=None):
        """The residual block around ``attend`` (normed input -> (output, extra)); returns (x, extra, MoEAux)."""
        h, extra = attend(self.attn_norm(x_BLD))
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x_BLD = x_BLD + h
        h = x_BLD if self.mlp_norm is None else self.mlp_norm(x_BLD)
        h, aux = self._feed_forward(h, segment_ids_BL, deterministic)
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        x_BLD = x_BLD + h
        if self.per_layer is not None:
            x_BLD = x_BLD + self.per_layer(x_BLD, per_layer_BLP, deterministic=deterministic)
        if self.layer_scalar is not None:
            x_BLD = x_BLD * self.layer_scalar[...].astype(x_BLD.dtype)
        return x_BLD, extra, aux

    def __call__(self, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic: bool = True):
        """(x, MoEAux of this layer or None in a dense model)."""
        x_BLD, aux, _ = self.forward(x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic)
        return x_BLD, aux

    def forward(self, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic: bool = True, per_layer_BLP=None,
                shared_kv=None):
        """(x, MoEAux or None, (k, v) the attention used): with the layer's per-layer input (Gemma 4) and the
        keys/values of the layer it reuses them from."""
        def attend(h):
            return self.attn.attend(h, cos_BLR, sin_BLR, segment_ids_BL, deterministic=deterministic,
                                    shared_kv=shared_kv)

        x_BLD, kv, aux = self._block(x_BLD, attend, deterministic, segment_ids_BL, per_layer_BLP)
        return x_BLD, aux, kv

    def decode(self, x_BTD, cos_BTR, sin_BTR, positions_BT, cache, per_layer_BTP=None, shared_cache=None):
        def attend(h):
            return self.attn.decode(h, cos_BTR, sin_BTR, positions_BT, cache, shared_cache)

        x, cache, _ = self._block(x_BTD, attend, True, per_layer_BLP=per_layer_BTP)
        return x, cache


class PerLayerInput(nnx.Module):
    """Gemma 4's per-layer input of one layer: ``norm(projection(act(gate(x)) * per_layer_input))``, added to the
    residual stream (the per-layer inputs themselves are computed once per forward: :class:`PerLayerEmbedding`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.activation = c.activation
        self.gate = Linear(c.hidden_size, c.per_layer_input_size, logical_axes=("embed", None), param_dtype=pd,
                           rngs=rngs)
        self.projection = Linear(c.per_layer_input_size, c.hidden_size, logical_axes=(None, "embed"),
                                 param_dtype=pd, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, param_dtype=pd)

    def __call__(self, x_BLD, per_layer_BLP, *, deterministic: bool = True):
        h = _ACTIVATIONS[self.activation](self.gate(x_BLD, deterministic=deterministic)) * per_layer_BLP
        return self.norm(self.projection(h, deterministic=deterministic))


class PerLayerEmbedding(nnx.Module):
    """The per-layer inputs of every layer [B, L, layers, P] (Gemma 4): a token embedding of width layers * P
    (scaled by sqrt(P)) plus a projection of the main embedding (scaled by hidden_size ** -0.5, RMS-normed per
    layer), the sum scaled by 2 ** -0.5."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.num_layers, self.size = c.num_layers, c.per_layer_input_size
        self.embed_scale = float(c.per_layer_input_size) ** 0.5
        self.projection_scale = float(c.hidden_size) ** -0.5
        self.embedding = Embed(c.per_layer_vocab_size or c.vocab_size, c.num_layers * c.per_layer_input_size,
                               param_dtype=pd, rngs=rngs)
        self.projection = Linear(c.hidden_size, c.num_layers * c.per_layer_input_size, logical_axes=("embed", None),
                                 param_dtype=pd, rngs=rngs)
        self.norm = RMSNorm(c.per_layer_input_size, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, param_dtype=pd)

    def __call__(self, tokens_BL, x_BLD, *, deterministic: bool = True):
        shape = (*tokens_BL.shape, self.num_layers, self.size)
        from_tokens = self.embedding(tokens_BL, dtype=x_BLD.dtype, scale=self.embed_scale).reshape(shape)
        projected = self.projection(x_BLD, deterministic=deterministic) * jnp.asarray(self.projection_scale,
                                                                                       x_BLD.dtype)
        return (self.norm(projected.reshape(shape)) + from_tokens) * jnp.asarray(2.0 ** -0.5, x_BLD.dtype)


def rope_tables(config: ModelConfig, positions_BL, segment_ids_BL=None):
    """cos, sin for every layer: arrays, or dicts by layer type when full and sliding layers rotate differently."""
    if not config.per_layer_type:
        return rope_cos_sin(config, positions_BL, segment_ids_BL)
    tables = {kind: rope_cos_sin(config.for_layer_type(kind), positions_BL, segment_ids_BL)
              for kind in sorted({config.layer_type(i) for i in range(config.num_layers)})}
    return {k: t[0] for k, t in tables.items()}, {k: t[1] for k, t in tables.items()}


def _run_layer(layer: DecoderLayer, x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic, per_layer_BLP=None,
               shared_kv=None):
    return layer.forward(x_BLD, cos_BLR, sin_BLR, segment_ids_BL, deterministic, per_layer_BLP, shared_kv)


def _add_aux(total, aux):
    return aux if total is None else (total if aux is None else total + aux)


class Decoder(nnx.Module):
    """Decoder-only LM. ``remat`` ('none' | 'full' | 'save_dots' | 'offload_dots') rematerializes each layer in the
    backward pass; ``attention_implementation`` names the ``pallas_kernels.attention`` implementation (None =
    automatic). ``layers`` is one module per layer, or stacked for ``lax.scan`` once
    :func:`sftjax.models.scan.stack_layers` ran (then ``scan_plan`` says how; see that module)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, remat: str | None = None,
                 attention_implementation: str | None = None):
        c = config
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.remat = remat or c.remat
        self.attention_implementation = attention_implementation
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, param_dtype=pd, rngs=rngs)
        self.per_layer_embedding = PerLayerEmbedding(c, rngs=rngs) if c.per_layer_input_size else None
        self.layers = nnx.List([DecoderLayer(c, i, rngs=rngs, attention_implementation=attention_implementation)
                                for i in range(c.num_layers)])
        self.scan_plan = None
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, plus_one=c.norm_plus_one, param_dtype=pd)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, logical_axes=("embed", "vocab"), param_dtype=pd,
                                  rngs=rngs)

    def configure(self, *, remat: str | None = None, attention_implementation: str | None = None,
                  dtype: str | None = None, moe: dict | None = None) -> "Decoder":
        """Set the run-time options of a built (e.g. loaded) model in place: remat policy, attention
        implementation (None = automatic), compute dtype and MoE switches (``moe``: MoEConfig fields such as
        ``router_z_loss_coef``, ``implementation``). They are static graph data, so a jitted function traced
        afterwards sees them; returns the model."""
        if moe:
            self.config = with_moe_overrides(self.config, moe)
            for _, node in nnx.iter_graph(self):
                if isinstance(node, MoE):
                    node.config = self.config.moe
        if remat is not None:
            if remat not in REMAT_POLICIES:
                raise ConfigError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}")
            self.remat = remat
            self.config = self.config.replace(remat=remat)
        if dtype is not None:
            self.config = self.config.replace(dtype=dtype)
        self.attention_implementation = attention_implementation
        for _, node in nnx.iter_graph(self):
            if isinstance(node, Attention):
                node.implementation = attention_implementation
        return self

    def head_weight(self):
        """[D, V]: the lm_head kernel (LoRA merged if any), or the tied embedding transposed; fsdp-gathered."""
        if self.lm_head is None:
            return gather_for_compute(self.embed_tokens.embedding[...], ("vocab", "embed")).T
        return self.lm_head.compute_kernel()

    def hidden_states(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, deterministic: bool = True,
                      return_aux: bool = False):
        """Final-norm hidden states [B, L, D]; positions default to 0..L-1 and segments to one per row. With
        ``return_aux``: (hidden, MoEAux summed over the layers), the aux None for a dense model."""
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(tokens_BL.shape, jnp.int32)
        dtype = jnp.dtype(self.config.dtype)
        x = self.embed_tokens(tokens_BL, dtype=dtype, scale=self.config.embedding_scale)
        cos, sin = rope_tables(self.config, positions_BL, segment_ids_BL)  # per-segment lengths
        policy = remat_policy(self.remat) if self.remat != "none" else None
        if self.scan_plan is not None:
            x, aux = run_scanned(self, x, cos, sin, segment_ids_BL, deterministic, policy=policy,
                                 remat=self.remat != "none")
        else:
            run = _run_layer
            if self.remat != "none":
                run = nnx.remat(_run_layer, policy=policy, static_argnums=(5,))
            per_layer = None
            if self.per_layer_embedding is not None:
                per_layer = self.per_layer_embedding(tokens_BL, x, deterministic=deterministic)
            aux, stored, producers = None, {}, self.config.kv_producers
            for i, layer in enumerate(self.layers):
                extra = (None if per_layer is None else per_layer[:, :, i], stored.get(layer.attn.kv_source))
                x, layer_aux, kv = run(layer, x, cos, sin, segment_ids_BL, deterministic, *extra)
                if i in producers:
                    stored[i] = kv
                aux = _add_aux(aux, layer_aux)
        return (self.norm(x), aux) if return_aux else self.norm(x)

    def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, deterministic: bool = True,
                 return_aux: bool = False):
        """float32 logits [B, L, V]; with ``return_aux``: (logits, MoEAux summed over the layers, or None)."""
        hidden, aux = self.hidden_states(tokens_BL, positions_BL=positions_BL, segment_ids_BL=segment_ids_BL,
                                         deterministic=deterministic, return_aux=True)
        return (self.logits(hidden), aux) if return_aux else self.logits(hidden)

    def logits(self, hidden_BLD):
        """float32 logits [..., V] of final hidden states [..., D] (soft-capped like training)."""
        return project_logits(hidden_BLD, self.head_weight().astype(hidden_BLD.dtype),
                              logit_softcap=self.config.final_logit_softcap)

    # ------------------------------------------------------------------------------------------- decode mode

    def init_cache(self, batch: int, length: int):
        """An empty KV cache for ``batch`` rows of ``length`` positions: per layer (k, v) [B, S, Hkv, D]."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        cache = []
        for i in range(c.num_layers):
            layer = c.for_layer_type(c.layer_type(i))
            # a layer that reuses another's keys/values reads that layer's cache and keeps none of its own
            rows = 0 if c.kv_source(i) is not None else length
            shape = (batch, rows, layer.num_kv_heads, layer.head_dim)
            cache.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        return tuple(cache)

    def decode(self, tokens_BT, positions_BT, cache):
        """Final-norm hidden states [B, T, D] of tokens at ``positions_BT`` (consecutive per row), reading and
        extending ``cache``; returns (hidden, new cache). Runs one module per layer (unstack a scanned model)."""
        if self.scan_plan is not None:
            raise ValueError("Decoder.decode runs one module per layer: use sftjax.models.scan.unstacked(model)")
        x = self.embed_tokens(tokens_BT, dtype=jnp.dtype(self.config.dtype), scale=self.config.embedding_scale)
        cos, sin = rope_tables(self.config, positions_BT)
        per_layer = None if self.per_layer_embedding is None else self.per_layer_embedding(tokens_BT, x)
        new_cache = []
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache)):
            source = layer.attn.kv_source
            x, layer_cache = layer.decode(x, cos, sin, positions_BT, layer_cache,
                                          None if per_layer is None else per_layer[:, :, i],
                                          None if source is None else new_cache[source])
            new_cache.append(layer_cache)
        return self.norm(x), tuple(new_cache)
