"""Chains and batches over devices with JAX's own sharding: a one-axis mesh, data replicated.

:func:`chain_mesh` turns the ``devices=`` argument of :class:`emdppl.MCMC` into a one-axis
:class:`jax.sharding.Mesh`; :func:`shard_chains` places arrays with a leading chain axis as
``NamedSharding(mesh, P("chain"))`` (each device holds ``num_chains / num_devices`` chains) and
:func:`replicate` places everything else (data, parameters) on every device. ``jit`` then
partitions warm-up and sampling by the shardings of its inputs: chains are independent, so the
compiled program has no collectives.

:func:`particle_mesh` does the same for :class:`emdppl.SVI`'s ELBO particles and posterior
draws over a ``"particle"`` axis (the particles are drawn inside the jitted step and split
there by :func:`constrain_leading`; their mean, and so the gradient, becomes an all-reduce).

:func:`batch_mesh` does the same for EM distillation (:func:`emdppl.distill`,
:class:`emdppl.EMD`) over a ``"batch"`` axis: the batch is drawn inside the jitted step, so
:func:`constrain_leading` splits it there (``with_sharding_constraint``) while the parameters
and optimiser states stay replicated (:func:`constrain_replicated`); the batch sums of the
gradients become all-reduces (data parallelism). Under ``jax.distributed`` (several processes)
a mesh spans the devices of every process (``jax.devices()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emdppl.base import PyTree

__all__ = [
    "BATCH_AXIS",
    "CHAIN_AXIS",
    "PARTICLE_AXIS",
    "batch_mesh",
    "chain_mesh",
    "constrain_leading",
    "constrain_replicated",
    "describe",
    "device_mesh",
    "particle_mesh",
    "place",
    "replicate",
    "shard_chains",
    "to_host",
]

CHAIN_AXIS = "chain"
BATCH_AXIS = "batch"
PARTICLE_AXIS = "particle"

#: What ``devices=`` accepts, besides a :class:`~jax.sharding.Mesh`.
Devices = None | str | int | Sequence[Any] | Mesh


def chain_mesh(devices: Devices, num_chains: int) -> Mesh | None:
    """The mesh of :class:`emdppl.MCMC`'s chains: :func:`device_mesh` with the axis
    ``"chain"``; ``num_chains`` must be a multiple of the number of devices (each device runs
    the same number of chains)."""
    return device_mesh(devices, CHAIN_AXIS, num_chains, "num_chains", "chains")


def batch_mesh(devices: Devices, batch_size: int) -> Mesh | None:
    """The mesh of EM distillation's batch (:func:`emdppl.distill`): :func:`device_mesh` with
    the axis ``"batch"``; ``batch_size`` must be a multiple of the number of devices (each
    device runs the same number of E-step chains and student draws).

    Examples
    --------
    >>> mesh = emdppl.sharding.batch_mesh("all", 1024)  # doctest: +SKIP
    >>> mesh.axis_names, mesh.devices.size  # doctest: +SKIP
    (('batch',), 4)
    """
    return device_mesh(devices, BATCH_AXIS, batch_size, "batch_size", "draws of the batch")


def particle_mesh(devices: Devices, num_particles: int) -> Mesh | None:
    """The mesh of :class:`emdppl.SVI`'s ELBO particles: :func:`device_mesh` with the axis
    ``"particle"``; ``num_particles`` (draws of the guide per ELBO estimate) must be a multiple
    of the number of devices."""
    return device_mesh(devices, PARTICLE_AXIS, num_particles, "num_particles", "ELBO particles")


def device_mesh(devices: Devices, axis: str, size: int, name: str, what: str) -> Mesh | None:
    """A one-axis mesh named ``axis`` for ``devices``: ``None`` (the default device, no mesh),
    ``"all"`` (``jax.devices()``), an int ``n`` (the first ``n``), a list of devices, or a
    one-axis ``Mesh`` (its axis renamed ``axis``). ``size`` (the length of the axis to split,
    called ``name`` in errors; ``what`` says what it counts) must be a multiple of the number
    of devices.

    Raises
    ------
    ValueError
        For an unknown spec, more devices than exist, or a size that does not divide evenly.
    """
    if devices is None:
        return None
    usage = f"devices must be None, 'all', an int, a list of devices or a Mesh, got {devices!r}."
    if isinstance(devices, Mesh):
        if devices.devices.ndim != 1:
            raise ValueError(
                f"devices: a Mesh with one axis is needed ({what} over it), got axes "
                f"{devices.axis_names}."
            )
        chosen = list(devices.devices.flat)
    elif isinstance(devices, str):
        if devices != "all":
            raise ValueError(usage)
        chosen = jax.devices()
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices={devices}: between 1 and the {len(available)} device(s) JAX sees "
                f"({available[0].platform}). On a CPU, more are made with XLA_FLAGS="
                "--xla_force_host_platform_device_count=N before JAX starts."
            )
        chosen = available[:devices]
    elif (
        isinstance(devices, Sequence)
        and devices
        and all(isinstance(d, jax.Device) for d in devices)
    ):
        chosen = list(devices)
    else:
        raise ValueError(usage)
    if size % len(chosen):
        rounded = len(chosen) * -(-size // len(chosen))
        raise ValueError(
            f"{name}={size} is not a multiple of the {len(chosen)} devices: every device "
            f"runs the same number of {what}. Use {name}={rounded} or fewer devices."
        )
    return Mesh(np.asarray(chosen), (axis,))


def shard_chains(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """The arrays of ``tree`` (leading axis: chains, or a batch) split over ``mesh``'s axis;
    other leaves as they are. ``mesh=None``: ``tree`` unchanged."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.tree.map(lambda x: place(x, sharding) if eqx.is_array(x) else x, tree)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Every array of ``tree`` (a pytree, e.g. a log density holding the data) on every device
    of ``mesh``; ``mesh=None``: unchanged."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: place(x, sharding) if eqx.is_array(x) else x, tree)


def constrain_leading(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Inside ``jit``: the arrays of ``tree`` (leading axis: a batch) constrained to be split
    over ``mesh``'s axis (``jax.lax.with_sharding_constraint``), so the work on them is
    partitioned and reductions over the batch become all-reduces. ``mesh=None``: unchanged."""
    if mesh is None:
        return tree
    return _constrain(tree, NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])))


def constrain_replicated(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Inside ``jit``: the arrays of ``tree`` (parameters, optimiser states) constrained to be
    the same on every device of ``mesh``. ``mesh=None``: unchanged."""
    if mesh is None:
        return tree
    return _constrain(tree, NamedSharding(mesh, PartitionSpec()))


def _constrain(tree: PyTree, sharding: NamedSharding) -> PyTree:
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding) if eqx.is_array(x) else x, tree
    )


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (the same value on every process) laid out by ``sharding``: ``device_put`` within
    one process; across processes each one builds its own shards from its copy (no check that
    the copies agree, no transfer)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(place(jax.random.key_data(x), sharding))
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: Any) -> Any:
    """A leaf as a NumPy array, gathered from every process when it spans several (a call every
    process must make: it is a collective); typed PRNG keys as their raw key data; other
    leaves as they are."""
    if not isinstance(x, jax.Array):
        return np.asarray(x) if isinstance(x, np.ndarray | np.generic) else x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Mesh | None) -> list[str]:
    """The devices of ``mesh`` as strings (for ``attrs``); the default device without one."""
    devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    return [str(d) for d in devices]
