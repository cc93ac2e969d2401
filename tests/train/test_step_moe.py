"""The train step on a Mixture-of-experts model (a tiny Qwen3-MoE): the router aux losses against transformers
(PyTorch CPU float32), with one micro-batch and with gradient accumulation (the token-weighted definition), their
gradients through an SGD step, the per-expert token counts; and the same step sharded on 8 fake devices with the
experts split 2, 4 and 8 ways equal to one device."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from sftjax.config import LoraSection, OptimSection  # noqa: E402
from sftjax.errors import ConfigError  # noqa: E402
from sftjax.models.loading import load_model  # noqa: E402
from sftjax.peft.lora import split_model  # noqa: E402
from sftjax.sharding import make_mesh, shard_model  # noqa: E402
from sftjax.train.optim import make_optimizer  # noqa: E402
from sftjax.train.program import check_expert_mesh  # noqa: E402
from sftjax.train.step import LossOptions, TrainState, make_train_step  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

VOCAB, LENGTH, EXPERTS, K = 96, 16, 8, 2
LB_COEF, Z_COEF = 0.05, 0.01
HF = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=EXPERTS, num_experts_per_tok=K,
          norm_topk_prob=True, mlp_only_layers=[1], router_aux_loss_coef=LB_COEF, output_router_logits=True,
          tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=64)


def _hf_model():
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**HF, attn_implementation="eager"))
    model = model.float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_((0.5 if name.endswith("mlp.gate.weight") else 0.05) * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf_model = _hf_model()
    directory = tmp_path_factory.mktemp("qwen3_moe")
    hf_model.save_pretrained(directory)
    return hf_model, directory


def _batch(seed: int, rows: int) -> dict:
    """One example per row (random length, then padding): the batch contract."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((rows, LENGTH), np.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                             "positions")}
    for row in range(rows):
        n = int(rng.integers(6, LENGTH + 1))
        tokens = rng.integers(3, VOCAB, n)
        batch["tokens"][row, :n] = tokens
        batch["targets"][row, :n - 1] = tokens[1:]
        batch["loss_mask"][row, :n - 1] = (rng.random(n - 1) < 0.7)
        batch["loss_mask"][row, n - 2] = 1
        batch["segment_ids"][row, :n] = 1
        batch["positions"][row, :n] = np.arange(n)
    return batch


def _step(model, *, accum_shape=None):
    graphdef, trainable, frozen = split_model(model, LoraSection())
    tx, schedule = make_optimizer(OptimSection(name="sgd", learning_rate=1.0, schedule="constant", no_decay=[]), 10)
    options = LossOptions(router_aux_loss_coef=LB_COEF, router_z_loss_coef=Z_COEF)
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    step = make_train_step(graphdef, tx, schedule, options, donate=False, param_shardings=shardings)
    return step, TrainState.create(trainable, tx), frozen


def _flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _torch_reference(hf_model, micro_batches):
    """The step's objective in PyTorch: sum_m CE_sum_m / T + lb_coef * sum_m N_m lb_m / N + z_coef * (the same for
    z), lb_m being transformers' load-balancing loss of micro-batch m (with its attention mask) and z_m the router
    z-loss of its real tokens over every MoE layer. Returns (values, gradients by HF parameter name)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    hf_model.zero_grad()
    trained = sum(float(b["loss_mask"].sum()) for b in micro_batches)
    real = sum(float((b["segment_ids"] != 0).sum()) for b in micro_batches)
    ce_total, lb_total, z_total, counts = 0.0, 0.0, 0.0, np.zeros(EXPERTS)
    for b in micro_batches:
        mask = torch.tensor(b["segment_ids"] != 0, dtype=torch.long)
        out = hf_model(input_ids=torch.tensor(b["tokens"], dtype=torch.long), attention_mask=mask,
                       position_ids=torch.tensor(b["positions"], dtype=torch.long), use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB),
                                               torch.tensor(b["targets"], dtype=torch.long).reshape(-1),
                                               reduction="none")
        ce_total = ce_total + (ce * torch.tensor(b["loss_mask"], dtype=torch.float32).reshape(-1)).sum()
        tokens = float(mask.sum())
        lb_total = lb_total + tokens * out.aux_loss
        keep = mask.reshape(-1).bool()
        z_total = z_total + tokens * router_z_loss_func(torch.cat([l[keep] for l in out.router_logits])[None])
        for logits in out.router_logits:
            chosen = torch.topk(logits[keep], K, dim=-1).indices.reshape(-1).numpy()
            counts += np.bincount(chosen, minlength=EXPERTS)
    objective = ce_total / trained + LB_COEF * lb_total / real + Z_COEF * z_total / real
    objective.backward()
    values = dict(loss=float(ce_total.detach() / trained), router_aux_loss=float(lb_total.detach() / real),
                  router_z_loss=float(z_total.detach() / real), counts=counts)
    return values, {name: p.grad.detach().clone() for name, p in hf_model.named_parameters()}


def _grads_in_our_layout(grads, tmp_path) -> dict[str, np.ndarray]:
    """The reference gradients saved as if they were weights and read back through the checkpoint loader."""
    holder = _hf_model()
    with torch.no_grad():
        for name, parameter in holder.named_parameters():
            parameter.copy_(grads[name])
    holder.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, dtype=jnp.float32)
    return _flat(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("accum", [1, 2], ids=["one_micro_batch", "accumulation"])
def test_router_losses_and_gradients_match_transformers(checkpoint, tmp_path, accum):
    hf_model, directory = checkpoint
    micro = [_batch(seed, rows=2) for seed in range(accum)]
    batch = {k: np.stack([b[k] for b in micro]) for k in micro[0]}
    model, _ = load_model(directory, dtype=jnp.float32)
    step, state, frozen = _step(model)
    before = _flat(state.params)
    new_state, metrics = step(state, frozen, batch, jax.random.key(0))
    values, grads = _torch_reference(hf_model, micro)

    assert_close(metrics["loss"], values["loss"], 1e-5, what="cross-entropy")
    assert_close(metrics["router_aux_loss"], values["router_aux_loss"], 1e-5, what="load-balancing loss")
    assert_close(metrics["router_z_loss"], values["router_z_loss"], 1e-5, what="router z-loss")
    counts = np.array([float(metrics[f"expert_tokens_{e}"]) for e in range(EXPERTS)])
    np.testing.assert_array_equal(counts, values["counts"])
    assert counts.sum() == K * 2 * sum(float((b["segment_ids"] != 0).sum()) for b in micro)  # 2 MoE layers
    if accum == 2:  # the token-weighted mean differs from the plain mean of the micro-batches' values
        singles = [_torch_reference(hf_model, [b])[0]["router_aux_loss"] for b in micro]
        assert abs(np.mean(singles) - values["router_aux_loss"]) > 1e-6
    after = _flat(new_state.params)
    reference = _grads_in_our_layout(grads, tmp_path / "grads")
    assert set(after) == set(reference)
    for path, want in reference.items():  # SGD with lr 1: the update is the gradient
        assert_close(before[path] - after[path], want, 5e-5, what=f"gradient of {path}")


@pytest.mark.parametrize("expert_split", [2, 4, 8])
def test_sharded_step_equals_one_device(checkpoint, expert_split):
    """The whole train step (2 micro-batches of 8 rows) with the experts split over fsdp and tokens exchanged by
    all_to_all: loss, aux losses, expert counts and every updated parameter equal one device's."""
    _, directory = checkpoint
    micro = [_batch(10 + seed, rows=8) for seed in range(2)]
    batch = {k: jnp.asarray(np.stack([b[k] for b in micro])) for k in micro[0]}
    model, _ = load_model(directory, dtype=jnp.float32)
    step, state, frozen = _step(model)
    want_state, want = step(state, frozen, batch, jax.random.key(0))

    mesh = make_mesh(8 // expert_split, expert_split, 1)
    model, config = load_model(directory, dtype=jnp.float32, mesh=mesh)
    check_expert_mesh(config, mesh)
    shard_model(model, mesh)
    expert_kernel = model.layers[0].mlp.experts.gate_proj.kernel.get_value()
    assert expert_kernel.addressable_shards[0].data.shape[0] == EXPERTS // expert_split
    step, state, frozen = _step(model)
    rows = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    sharded = {k: jax.device_put(v, rows) for k, v in batch.items()}
    assert "all-to-all" in step.lower(state, frozen, sharded, jax.random.key(0)).compile().as_text()
    got_state, got = step(state, frozen, sharded, jax.random.key(0))
    for key in want:
        assert_close(got[key], want[key], 1e-5, what=key)
    got_params, want_params = _flat(got_state.params), _flat(want_state.params)
    for path, value in want_params.items():
        assert_close(got_params[path], value, 1e-5, what=f"updated {path}")


def test_expert_count_not_divisible_by_the_expert_axis(checkpoint):
    _, directory = checkpoint
    _, config = load_model(directory, dtype=jnp.float32)
    six = config.replace(moe=config.moe.replace(num_experts=6))
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by the expert-parallel mesh axis fsdp=4"
                       ) as error:
        check_expert_mesh(six, make_mesh(2, 4, 1))
    assert "\n" not in str(error.value)
