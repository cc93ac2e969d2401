"""Compile the MoE block's forward and backward for TPU without a TPU: libtpu's real compiler on an abstract
v5p topology (``jax.experimental.topologies``), with each grouped-matmul implementation, on one chip and with the
experts split over 4 chips (``shard_map`` + ``all_to_all``). It records per-device memory and whether each
compiled; ``sftjax.models.moe.MEGABLOX_ON_TPU`` rests on this.

    pip install --target /tmp/libtpu libtpu==0.0.42.*      # the libtpu of jax 0.10's jax[tpu]
    PYTHONPATH=$PWD:/tmp/libtpu python scripts/check_moe_tpu_lowering.py \
        [--out benchmarks/results/moe_tpu_lowering.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import traceback

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sftjax.models.moe import MoE, MoEConfig  # noqa: E402
from sftjax.models.moe_sharding import EXPERT_RULES  # noqa: E402
from sftjax.sharding import MESH_AXES, partition_spec  # noqa: E402


def compile_step(config: MoEConfig, devices, mesh_shape, batch: int, length: int) -> dict:
    mesh = Mesh(np.asarray(devices).reshape(mesh_shape), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = nnx.eval_shape(lambda: MoE(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def with_sharding(variable):
        value = variable.get_value()
        spec = partition_spec(variable.get_metadata().get("logical_axes"), value.shape, mesh, EXPERT_RULES)
        return variable.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))

    state = jax.tree.map(with_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    x = jax.ShapeDtypeStruct((batch, length, config.hidden_size), jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                               sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))

    def loss(state, x, seg):
        y, aux = nnx.merge(graphdef, state)(x, seg)
        lb, count = aux.load_balancing()
        return jnp.sum(y.astype(jnp.float32)) + lb / count

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, seg).compile()
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    return {"compiled": True, "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "mosaic_kernels": text.count("tpu_custom_call"), "all_to_all": text.count("all-to-all")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices = topology.devices
    base = MoEConfig(hidden_size=512, expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2)
    results = {"topology": args.topology, "device_kind": devices[0].device_kind, "jax": jax.__version__,
               "host": platform.node(), "layer": "D=512 F=256 E=8 k=2, bf16, batch 8 x 512", "runs": {}}
    for implementation in ("ragged_dot", "megablox", "dense"):
        for name, mesh_devices, shape in (("1 chip", devices[:1], (1, 1, 1)),
                                          ("experts over 4 chips", devices, (1, 4, 1))):
            key = f"{implementation}, {name}"
            try:
                results["runs"][key] = compile_step(base.replace(implementation=implementation), mesh_devices, shape,
                                                    8, 512)
            except Exception as error:  # record the failure, keep checking the others
                results["runs"][key] = {"compiled": False,
                                        "error": traceback.format_exception_only(error)[-1].strip()[:400]}
            print(key, results["runs"][key], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
