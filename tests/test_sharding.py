"""Meshes, logical-axis rules, and a model loaded straight into a (2 fsdp x 4 tensor) mesh."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from sftjax.models.loading import load_model  # noqa: E402
from sftjax.sharding import batch_sharding, make_mesh, partition_spec  # noqa: E402
from tests.oracle import assert_close  # noqa: E402


def test_make_mesh_sizes():
    assert len(jax.devices()) == 8
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_partition_spec_rules_and_indivisible_fallback():
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    assert partition_spec(("embed", "heads"), (64, 128), mesh) == PartitionSpec("fsdp", "tensor")
    assert partition_spec(("vocab", "embed"), (96, 64), mesh) == PartitionSpec("tensor", "fsdp")
    assert partition_spec(("norm",), (64,), mesh) == PartitionSpec(None)
    # 6 is not divisible by 4: that dimension stays replicated instead of failing
    assert partition_spec(("embed", "kv_heads"), (64, 6), mesh) == PartitionSpec("fsdp", None)
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"), None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(directory)
    return directory


def test_sharded_load_matches_unsharded(hf_dir):
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    sharded, _ = load_model(hf_dir, mesh=mesh)
    plain, _ = load_model(hf_dir)
    kernel = sharded.layers[0].attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert len({shard.device for shard in kernel.addressable_shards}) == 8
    assert kernel.addressable_shards[0].data.shape == (32, 16)
    assert sharded.lm_head.kernel.get_value().sharding.spec == PartitionSpec("fsdp", "tensor")
    assert sharded.layers[1].attn.k_proj.bias.get_value().sharding.spec == PartitionSpec("tensor")

    tokens = np.random.default_rng(0).integers(0, 128, size=(2, 16)).astype(np.int32)
    expected = np.asarray(plain(jnp.asarray(tokens)))
    tokens_sharded = jax.device_put(jnp.asarray(tokens), batch_sharding(mesh))
    got = np.asarray(jax.jit(lambda t: sharded(t))(tokens_sharded))
    assert_close(got, expected, 1e-5, what="logits")


def test_parameter_shardings_and_shard_model_on_a_fresh_model():
    from flax import nnx

    from sftjax.models.config import ModelConfig
    from sftjax.models.decoder import Decoder
    from sftjax.sharding import parameter_shardings, shard_model

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    model = Decoder(config, rngs=nnx.Rngs(0))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = parameter_shardings(model, mesh)
    assert shardings["layers"][0]["mlp"]["down_proj"]["kernel"].get_value().spec == PartitionSpec("tensor", "fsdp")
    placed = jax.device_put(nnx.state(model), shardings)
    assert placed["embed_tokens"]["embedding"].get_value().sharding.spec == PartitionSpec("tensor", "fsdp")
    before = np.asarray(model(jnp.zeros((2, 8), jnp.int32)))
    shard_model(model, mesh)
    assert model.layers[0].attn.o_proj.kernel.get_value().sharding.spec == PartitionSpec("tensor", "fsdp")
    assert_close(np.asarray(model(jnp.zeros((2, 8), jnp.int32))), before, 1e-5, what="logits")
