"""Running a Pallas kernel per device when its inputs are sharded over a mesh.

Why: XLA's SPMD partitioner cannot look inside a ``pallas_call``. Given sharded operands it either gathers them
whole onto every device and runs the whole kernel everywhere (right answer, N times the work and memory) or
fails. The XLA implementations (``reference``, ``xla_chunked``) partition like any jnp code and need none of this.

How: the apis ask :func:`find_mesh` for the mesh their inputs live on. In jax 0.10 every value computed from
mesh-placed arrays carries that mesh in its abstract type (``jax.typeof(x).sharding.mesh``), inside ``jax.jit``,
``lax.scan`` bodies, ``jax.checkpoint`` and ``jax.grad`` alike, with ``AxisType.Auto`` axes and without any
``jax.set_mesh`` context; a context mesh (``jax.set_mesh``) is used first when there is one. The api then says,
per array dimension, which mesh axes may split it (:func:`split_axes` keeps only the axes whose sizes divide the
dimension) and calls the kernel inside ``jax.shard_map`` over those specs (:func:`run_per_device`). Each device
then runs the kernel on its own rows (and heads); anything the kernel sums over a split dimension is ``psum``'d
by the caller inside the mapped function. An input that is replicated into the map (the vocabulary weight of the
loss) gets its gradient summed over the devices by shard_map's transpose.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, PartitionSpec

ROW_AXES = ("data", "fsdp")  # the batch-row axes of sftjax meshes (sftjax.sharding.batch_sharding)
HEAD_AXIS = "tensor"


def _usable(mesh) -> bool:
    return mesh is not None and not mesh.empty and mesh.size > 1


def find_mesh(*arrays) -> Mesh | AbstractMesh | None:
    """The mesh the inputs live on (the ``jax.set_mesh`` context first), or None when there is none to split over.

    Axes that are already manual (the caller is itself inside a ``shard_map``) are not ours to split: a mesh
    with any manual axis returns None, so the kernel runs as called, per device.
    """
    candidates = [jax.sharding.get_abstract_mesh()]
    for x in arrays:
        sharding = getattr(jax.typeof(x), "sharding", None)
        candidates.append(getattr(sharding, "mesh", None))
    for mesh in candidates:
        if _usable(mesh):
            if any(kind == AxisType.Manual for kind in mesh.axis_types):
                return None
            return mesh
    return None


def axis_size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[name] for name in axes)


def split_axes(mesh, size: int, candidates: Sequence[str], taken: Sequence[str] = ()) -> tuple[str, ...]:
    """The candidate mesh axes (in order, size > 1, not yet ``taken``) whose product divides ``size``.

    An axis that would not divide what is left of the dimension is skipped: that dimension is not split over
    it (the devices along it share the work), which is always correct.
    """
    chosen: list[str] = []
    for name in candidates:
        if name not in mesh.shape or name in taken or name in chosen or mesh.shape[name] == 1:
            continue
        if size % (axis_size(mesh, chosen) * mesh.shape[name]) == 0:
            chosen.append(name)
    return tuple(chosen)


def spec_entry(axes: Sequence[str]):
    """A PartitionSpec entry: None for no split, the axis name for one, a tuple for several."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def run_per_device(fn: Callable, mesh, in_specs: tuple[PartitionSpec, ...], out_specs, *args):
    """``fn(*args)`` inside ``jax.shard_map`` over all of ``mesh``'s axes (manual everywhere).

    Axes a spec does not name replicate that input onto every device along them; ``out_specs`` must only
    leave out axes over which ``fn``'s outputs are equal (psum them inside ``fn`` otherwise).

    ``check_vma=False``: with the check on, every ``pallas_call`` output shape would have to declare how it
    varies over the mesh (``ShapeDtypeStruct(manual_axis_type=...)``), which the kernels do not. Without it,
    shard_map's transpose scales an output's cotangent down by the devices it is replicated over, and psums the
    cotangent of an input over the axes its spec leaves out: a replicated weight gets the sum of every
    device's gradient, each row counted once (``tests/kernels/test_sharding.py`` checks this against the
    unsharded reference).
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
