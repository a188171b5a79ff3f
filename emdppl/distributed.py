"""Several processes (or hosts) as one JAX runtime: a thin layer over ``jax.distributed``.

``jax.distributed.initialize`` must run before JAX starts a backend, and importing emdppl
starts one (blackjax builds arrays at import). So emdppl joins the runtime **when it is
imported**, from the environment::

    EMDPPL_COORDINATOR=10.0.0.1:1234 EMDPPL_NUM_PROCESSES=2 EMDPPL_PROCESS_ID=0 python run.py

(``EMDPPL_COORDINATOR=auto``: JAX reads the cluster's own variables: SLURM, Open MPI, ...), or
the script calls :func:`initialize` (or ``jax.distributed.initialize``) before ``import
emdppl``. After that ``jax.devices()`` lists the devices of all processes, so
``emdppl.MCMC(..., devices="all")`` splits the chains over all of them (each process runs its
own). Draws are gathered for every process at the end of a run (the ArviZ data are the same
everywhere: write them where :func:`is_main_process`). Checkpoints are per process
(``checkpoint_dir/process_<i>_of_<n>``, :func:`emdppl.run`), and the processes resume together at
the last chunk all of them wrote; the Pyro bridge evaluates its model on the host of one process
and stays single-process.

This module imports only JAX, so ``from emdppl.distributed import initialize`` is cheap, but it
still runs ``emdppl/__init__``: use the environment, or ``jax.distributed.initialize``, when
the script imports emdppl first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

__all__ = ["initialize", "initialize_from_environment", "is_main_process"]

#: The environment variables :func:`initialize_from_environment` reads.
ENVIRONMENT = ("EMDPPL_COORDINATOR", "EMDPPL_NUM_PROCESSES", "EMDPPL_PROCESS_ID")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
) -> None:
    """``jax.distributed.initialize(coordinator_address, num_processes, process_id,
    local_device_ids)``, with CPU collectives switched on (``cpu_collectives``: ``"gloo"`` or
    ``"mpi"``) so that processes without accelerators can gather draws; ``None`` arguments
    are read from the cluster environment (SLURM, Open MPI, ...), as JAX does.

    Raises
    ------
    RuntimeError
        When a JAX backend is already running (naming the two ways that work).
    """
    if cpu_collectives not in ("gloo", "mpi"):
        raise ValueError(f"cpu_collectives must be 'gloo' or 'mpi', got {cpu_collectives!r}.")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "emdppl.distributed.initialize: a JAX backend is already running (importing emdppl "
            "starts one), and jax.distributed must come first. Set EMDPPL_COORDINATOR, "
            "EMDPPL_NUM_PROCESSES and EMDPPL_PROCESS_ID before the script starts (emdppl joins "
            "at import), or call jax.distributed.initialize(...) before importing emdppl."
        )
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
    )


def initialize_from_environment() -> bool:
    """Join the runtime ``EMDPPL_COORDINATOR`` (``host:port`` or ``auto``),
    ``EMDPPL_NUM_PROCESSES`` and ``EMDPPL_PROCESS_ID`` describe, if the first is set (and JAX
    has not joined one yet); ``import emdppl`` calls it. Returns whether it joined."""
    address = os.environ.get(ENVIRONMENT[0])
    if not address or jax.distributed.is_initialized():
        return False
    count, index = (os.environ.get(k) for k in ENVIRONMENT[1:])
    if address != "auto" and (count is None or index is None):
        raise ValueError(
            f"{ENVIRONMENT[0]}={address!r} needs {ENVIRONMENT[1]} and {ENVIRONMENT[2]} too (or "
            f"{ENVIRONMENT[0]}=auto on a cluster JAX recognises)."
        )
    if address == "auto":
        initialize()
    else:
        initialize(address, int(count), int(index))
    return True


def is_main_process() -> bool:
    """Whether this is process 0 (the one that should write results)."""
    return jax.process_index() == 0
