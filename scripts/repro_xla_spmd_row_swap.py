"""Standalone reproduction of the XLA SPMD mis-partitioning that sftjax.sharding.gather_for_compute works around.

Seen with jax 0.10.2 on 8 fake CPU devices, with Shardy and with GSPMD (so in the shared SPMD partitioner, before
any backend pass). Mesh (data=2, fsdp=2, tensor=2); x [4, L, D] has its rows split over (data, fsdp), one row per
shard; w1 [D, F] and w2 [F, D] are split (fsdp, tensor). In grad_x of sum((x @ w1 @ w2) ** 2) the partitioner
puts a collective-permute {2<->4, 3<->5} on the cotangent before the w2-transpose matmul (to line the batch
shards up with w2's fsdp groups) and never permutes back: rows 1 and 2 of the gradient come out swapped. With 2
rows per shard, unsharded rows, weights split over fsdp only or tensor only, or rows split (fsdp, data) instead of
(data, fsdp) the result is right; explicit jit in/out shardings or jax.set_mesh do not change it. Gathering the
weights over fsdp before the matmul (what FSDP means) avoids it. Dump with XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_pass_re=.*
and read the module after 'spmd-partitioning' to see the permute.

Run: python scripts/repro_xla_spmd_row_swap.py  (prints whether the bug is present; exit status 0 either way)
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main() -> None:
    rows, length, dim, hidden = 4, 32, 32, 64
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, length, dim)), jnp.float32)
    w1 = jnp.asarray(rng.normal(size=(dim, hidden)) * 0.2, jnp.float32)
    w2 = jnp.asarray(rng.normal(size=(hidden, dim)) * 0.2, jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    weight_sharding = NamedSharding(mesh, P("fsdp", "tensor"))
    row_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    gathered = NamedSharding(mesh, P(None, "tensor"))

    def plain(x, w1, w2):
        return jnp.sum((x @ w1 @ w2) ** 2)

    def weights_gathered(x, w1, w2):
        w1, w2 = (jax.lax.with_sharding_constraint(w, gathered) for w in (w1, w2))
        return jnp.sum((x @ w1 @ w2) ** 2)

    print(f"jax {jax.__version__}, shardy={jax.config.jax_use_shardy_partitioner}")
    for name, loss in (("plain", plain), ("weights fsdp-gathered", weights_gathered)):
        grad_x = jax.jit(jax.grad(loss))
        expected = np.asarray(grad_x(x, w1, w2))  # one device
        got = np.asarray(grad_x(jax.device_put(x, row_sharding), jax.device_put(w1, weight_sharding),
                                jax.device_put(w2, weight_sharding)))
        error = np.abs(got - expected).max() / np.abs(expected).max()
        swapped = [[j for j in range(rows) if np.allclose(got[i], expected[j], rtol=1e-4, atol=1e-4)]
                   for i in range(rows)]
        print(f"{name:>22}: max relative error {error:.2e}; row i of the sharded gradient equals unsharded rows "
              f"{swapped}; bug present: {error > 1e-4}")


if __name__ == "__main__":
    main()
