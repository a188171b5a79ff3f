"""The one driver: any :class:`~emdppl.base.Algorithm`, stepped in jitted ``lax.scan`` chunks.

Python loops only over chunks (to update the progress bar and write checkpoints), never over
steps or chains. Checkpoints are ``.npz`` arrays and a JSON index (no pickle), appended chunk by
chunk, and carry a fingerprint of the run so a directory reused by another run is refused.
Step ``i`` uses the key ``fold_in(rng_key, i)``, so a run resumed from a
checkpoint draws the same numbers as an uninterrupted one.

Over several processes (``jax.distributed``) each process writes its own checkpoint in
``checkpoint_dir/process_<i>_of_<n>`` (the gathered state and trace: no shared file system is
needed), and on resume the processes agree on the last chunk all of them wrote (a process that
was stopped one chunk behind the others is caught up from the previous state, which every
checkpoint keeps).

The chunk function is compiled once per algorithm *structure*: ``algorithm`` is passed to
``equinox.filter_jit`` as a pytree, so the arrays it holds (data, parameters) are traced
arguments and a second run on new data of the same shapes reuses the compiled code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from emdppl.base import Algorithm, PRNGKey, PyTree, as_key
from emdppl.sharding import place, to_host

__all__ = [
    "NUM_CHUNKS",
    "check_checkpoint_dir",
    "checkpoint_exists",
    "common_chunk_length",
    "load_state",
    "run",
]

_CHECKPOINT = "checkpoint.json"

#: About how many chunks :func:`run` splits a run into when it shows progress or checkpoints.
NUM_CHUNKS = 20

#: The most chunks :func:`common_chunk_length` accepts for a run without progress bar.
_MAX_SHARED_CHUNKS = 64


@eqx.filter_jit
def _chunk(
    algorithm: Algorithm,
    state: PyTree,
    rng_key: PRNGKey,
    start: jax.Array,
    length: int,
    thinning: int,
) -> tuple[PyTree, PyTree]:
    """Run ``length * thinning`` steps from step ``start``; keep every ``thinning``-th info."""

    def one_step(state, index):
        return algorithm.step(jax.random.fold_in(rng_key, index), state)

    if thinning == 1:  # no inner loop: one scan is cheaper to compile
        return jax.lax.scan(one_step, state, start + jnp.arange(length))

    def recorded_step(state, index):
        indices = index * thinning + jnp.arange(thinning)
        state, infos = jax.lax.scan(one_step, state, indices)
        return state, jax.tree.map(lambda x: x[-1], infos)

    indices = start // thinning + jnp.arange(length)
    return jax.lax.scan(recorded_step, state, indices)


def _chunk_length(num_records: int, target: int) -> int:
    """Largest divisor of ``num_records`` not above ``target`` (one compile for all chunks),
    unless that divisor is tiny, in which case ``target`` with a shorter last chunk."""
    best = max(d for d in range(1, min(num_records, target) + 1) if num_records % d == 0)
    return best if best * 4 >= min(num_records, target) else min(num_records, target)


def common_chunk_length(record_counts: tuple[int, ...], num_chunks: int) -> int | None:
    """One chunk length for runs of ``record_counts`` records each (runs of one algorithm,
    e.g. warm-up and sampling, that then share one compiled chunk): the largest divisor of
    their greatest common divisor not above ``max(record_counts) / num_chunks``, or ``None``
    (each run its own length) when that divisor would make the chunks many and tiny."""
    longest = max(record_counts)
    target = max(1, math.ceil(longest / num_chunks))
    common = math.gcd(*record_counts)
    best = max(d for d in range(1, min(common, target) + 1) if common % d == 0)
    return best if best * 4 >= target or longest // best <= _MAX_SHARED_CHUNKS else None


def check_checkpoint_dir(checkpoint_dir: str | os.PathLike | None) -> None:
    """Refuse, before anything heavy runs, a ``checkpoint_dir`` written by a run over another
    number of processes (its draws are not this run's to resume)."""
    if checkpoint_dir is not None:
        _process_directory(checkpoint_dir)


def _process_directory(checkpoint_dir: str | os.PathLike) -> Path:
    """Where this process keeps its checkpoint: ``checkpoint_dir`` in a run of one process,
    ``checkpoint_dir/process_<i>_of_<n>`` in a run of ``n``."""
    directory, count = Path(checkpoint_dir), jax.process_count()
    found = (re.fullmatch(r"process_\d+_of_(\d+)", p.name) for p in directory.glob("process_*"))
    layouts = {int(m.group(1)) for m in found if m}
    if (directory / _CHECKPOINT).exists():
        layouts.add(1)
    if layouts - {count}:
        raise ValueError(
            f"checkpoint_dir {directory} holds the checkpoint of a run over "
            f"{sorted(layouts - {count})[0]} process(es), and this run has {count}: resume it "
            "with as many processes, or pass another checkpoint_dir."
        )
    if count == 1:
        return directory
    return directory / f"process_{jax.process_index()}_of_{count}"


def _agreed_done(done: int) -> int:
    """The number of records every process has checkpointed (a collective with several)."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(done, dtype=np.int64))))


def run(
    rng_key: int | PRNGKey,
    algorithm: Algorithm,
    num_steps: int,
    state: PyTree,
    *,
    thinning: int = 1,
    num_chunks: int = NUM_CHUNKS,
    progress_bar: bool = True,
    desc: str = "running",
    checkpoint_dir: str | os.PathLike | None = None,
    chunk_length: int | None = None,
    keep_trace: bool = True,
) -> tuple[PyTree, PyTree]:
    """Advance ``state`` by ``num_steps`` steps of ``algorithm`` and stack what it reports.

    Parameters
    ----------
    rng_key
        An int seed or a JAX key; step ``i`` uses ``fold_in(rng_key, i)``.
    algorithm
        ``Algorithm(init, step)``; ``step(rng_key, state) -> (state, info)`` must be jittable.
        Batched work (chains, particles) is the algorithm's business: it ``vmap``\\s inside
        ``step``.
    num_steps
        Number of steps, a multiple of ``thinning``.
    state
        The initial state (from ``algorithm.init``).
    thinning
        Keep the ``info`` of every ``thinning``-th step.
    num_chunks
        About how many jitted chunks to split the run into (progress-bar and checkpoint
        granularity). Without a progress bar or checkpoints the run is one chunk: each chunk
        is a separate XLA execution (about 3 ms each on CPU, 30% of a 0.2 s NUTS run).
    progress_bar
        Show a tqdm bar over steps.
    desc
        Label of the progress bar.
    chunk_length
        Records per chunk, in place of the length ``num_chunks`` gives (the last chunk may be
        shorter); each length is a compilation of the chunk (:func:`common_chunk_length`).
    keep_trace
        Collect the trace; ``False``: return ``None`` for it (a burn-in).
    checkpoint_dir
        If given, the state and each new chunk of the trace are written there after every chunk
        (NumPy ``.npz`` files and a JSON index, never pickle: loading runs no code; each chunk
        is written once, so the cost is linear in the run's length). A run that finds a
        checkpoint there resumes from it, bit for bit, if it is the same run (a fingerprint of
        the algorithm's data and settings, the state's layout, the key and the length); a
        checkpoint of another run raises an error rather than returning its draws. With
        several processes each writes ``checkpoint_dir/process_<i>_of_<n>`` (see the module
        docstring); a directory of another process count is refused.

    Returns
    -------
    state
        The final state.
    trace
        ``info`` of the recorded steps, stacked along a new leading axis of length
        ``num_steps // thinning``, as NumPy arrays.
    """
    if num_steps < 0 or thinning < 1 or num_steps % thinning:
        raise ValueError(
            f"num_steps={num_steps} must be >= 0 and a multiple of thinning={thinning} (>= 1)."
        )
    if not keep_trace and checkpoint_dir is not None:
        raise ValueError("keep_trace=False cannot be checkpointed: a checkpoint holds the trace.")
    check_checkpoint_dir(checkpoint_dir)
    rng_key = as_key(rng_key)
    num_records = num_steps // thinning
    if num_records == 0:
        return state, None
    if not progress_bar and checkpoint_dir is None:
        num_chunks = 1
    length = _chunk_length(num_records, max(1, math.ceil(num_records / num_chunks)))
    if chunk_length is not None:
        length = chunk_length

    done, chunks = 0, []
    directory = _process_directory(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is not None:
        meta = {
            "num_records": num_records,
            "thinning": thinning,
            "fingerprint": _fingerprint(algorithm, state, rng_key, num_records, thinning),
        }
        done, state, chunks = _load_checkpoint(directory, meta, algorithm, state, rng_key)

    bar = tqdm(total=num_steps, initial=done * thinning, desc=desc, disable=not progress_bar)
    try:
        while done < num_records:
            n = min(length, num_records - done)
            state, infos = _chunk(
                algorithm, state, rng_key, jnp.asarray(done * thinning), n, thinning
            )
            if keep_trace and directory is None:  # copy to the host now, collect at the end
                jax.tree.map(_copy_to_host_async, infos)
                chunks.append(infos)
            elif keep_trace:
                chunks.append(jax.tree.map(to_host, infos))
            done += n
            bar.update(n * thinning)
            if directory is not None:
                _save_checkpoint(directory, meta, done, state, chunks[-1], len(chunks) - 1)
    finally:
        bar.close()
    if not keep_trace:
        return state, None
    chunks = jax.tree.map(to_host, chunks)
    trace = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *chunks)
    return state, trace


def _copy_to_host_async(x: jax.Array) -> None:
    if x.is_fully_addressable:  # arrays over several processes are gathered at the end
        x.copy_to_host_async()


def _fingerprint(
    algorithm: Algorithm, state: PyTree, rng_key: PRNGKey, num_records: int, thinning: int
) -> str:
    """SHA-256 of what decides a run: the algorithm's arrays (data, parameters) and static
    structure (model, sampler, settings: reprs without memory addresses), the state's
    structure, shapes and dtypes, the key, the length and the thinning."""
    digest = hashlib.sha256()
    arrays, static = eqx.partition((algorithm, state), eqx.is_array)
    digest.update(_address_free(repr(jax.tree.structure(static))).encode())
    for leaf in jax.tree.leaves(static):  # functions and other non-array leaves
        code = getattr(leaf, "__code__", None)
        digest.update(_address_free(repr(leaf)).encode())
        if code is not None:
            digest.update(code.co_code)
    digest.update(_address_free(repr(jax.tree.structure(arrays))).encode())
    algorithm_arrays, state_arrays = arrays
    for leaf in jax.tree.leaves(algorithm_arrays):
        digest.update(np.ascontiguousarray(_host(leaf)).tobytes())
    for leaf in jax.tree.leaves(state_arrays):
        digest.update(f"{jnp.shape(leaf)}{leaf.dtype}".encode())
    digest.update(np.asarray(jax.random.key_data(rng_key)).tobytes())
    digest.update(f"{num_records}/{thinning}".encode())
    return digest.hexdigest()


def _address_free(text: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def _host(leaf: Any) -> np.ndarray:
    """A leaf as a NumPy array (typed PRNG keys as their raw key data)."""
    return np.asarray(to_host(leaf))


def _write_arrays(path: Path, tree: PyTree) -> None:
    """The leaves of ``tree`` as ``leaf_<i>`` in an ``.npz`` (no pickle), written atomically."""
    arrays = {f"leaf_{i}": _host(x) for i, x in enumerate(jax.tree.leaves(tree))}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _read_arrays(path: Path, like: PyTree, as_jax: bool) -> PyTree:
    """The tree written by :func:`_write_arrays`, with the structure and dtypes of ``like``
    (and, ``as_jax``, its shardings: chains split over devices stay split)."""
    leaves, treedef = jax.tree.flatten(like)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = [data[f"leaf_{i}"] for i in range(len(leaves))]
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(
            f"checkpoint file {path} is unreadable or incomplete ({err}); remove its directory "
            f"{path.parent} to start afresh."
        ) from None
    out = []
    for ref, x in zip(leaves, stored, strict=True):
        if jax.dtypes.issubdtype(jnp.result_type(ref), jax.dtypes.prng_key):
            x = jax.random.wrap_key_data(jnp.asarray(x))
        elif as_jax:
            x = np.asarray(x, dtype=jnp.result_type(ref))
        if as_jax and isinstance(ref, jax.Array):
            x = place(x, ref.sharding)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def _save_checkpoint(
    directory: Path, meta: dict, done: int, state: PyTree, chunk: PyTree, index: int
) -> None:
    """Append chunk ``index`` of the trace, then the state after it, then the metadata (the last
    write makes the checkpoint current, so an interrupted write loses nothing). Each chunk is
    written once: the cost is linear in the length of the run. The previous state is kept
    (a process one chunk ahead of another resumes from it); older ones are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_arrays(directory / f"chunk_{index:05d}.npz", chunk)
    name = f"state_{index:05d}.npz"
    _write_arrays(directory / name, state)
    current = _read_meta(directory)  # a process resumed one chunk back: its previous is kept
    candidates = [] if current is None else [current, current["previous"]]
    previous = next((e for e in candidates if e is not None and e["done"] < done), None)
    previous = None if previous is None else {k: previous[k] for k in _ENTRY}
    entry = {"done": done, "num_chunks": index + 1, "state": name}
    tmp = directory / (_CHECKPOINT + ".tmp")
    tmp.write_text(json.dumps({**meta, **entry, "previous": previous}))
    os.replace(tmp, directory / _CHECKPOINT)
    keep = {name} if previous is None else {name, previous["state"]}
    for path in directory.glob("state_*.npz"):
        if path.name not in keep:
            path.unlink()


_ENTRY = ("done", "num_chunks", "state")


def _read_meta(directory: Path) -> dict | None:
    """The checkpoint index in ``directory`` (``None`` if there is none)."""
    path = directory / _CHECKPOINT
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        previous = stored.get("previous")
        stored = {**stored, **_entry(stored)}
        stored["previous"] = None if previous is None else _entry(previous)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"checkpoint file {path} is unreadable ({err}); remove {directory} to start afresh."
        ) from None
    return stored


def _entry(raw: dict) -> dict:
    """One checkpoint (records done, trace chunks, state file) of the index, checked."""
    return {k: cast(raw[k]) for k, cast in zip(_ENTRY, (int, int, str), strict=True)}


def _load_checkpoint(
    directory: Path, meta: dict, algorithm: Algorithm, like: PyTree, rng_key: PRNGKey
) -> tuple[int, PyTree, list]:
    """``(done, state, chunks)`` to resume from: the checkpoint in ``directory`` at the
    number of records every process has written (``(0, like, [])`` when that is none)."""
    stored = _read_meta(directory)
    if stored is not None:
        _check_same_run(directory / _CHECKPOINT, stored, meta)
    done = _agreed_done(0 if stored is None else stored["done"])
    if done == 0:
        return 0, like, []
    entry = stored if stored["done"] == done else stored["previous"]
    if entry is None or entry["done"] != done:
        raise ValueError(
            f"the checkpoint in {directory} is at {stored['done']} records and another "
            f"process's at {done}: more than one chunk apart, so the processes cannot resume "
            f"together. Remove {directory.parent} to start afresh."
        )
    state = _read_arrays(directory / entry["state"], like, as_jax=True)
    _, info = jax.eval_shape(algorithm.step, rng_key, like)
    chunks = [
        _read_arrays(directory / f"chunk_{i:05d}.npz", info, as_jax=False)
        for i in range(entry["num_chunks"])
    ]
    return done, state, chunks


def _check_same_run(path: Path, stored: dict, meta: dict) -> None:
    if (stored.get("num_records"), stored.get("thinning")) != (
        meta["num_records"],
        meta["thinning"],
    ):
        raise ValueError(
            f"checkpoint {path} belongs to a run of "
            f"{stored.get('num_records', 0) * stored.get('thinning', 1)} steps with thinning "
            f"{stored.get('thinning')}, not {meta['num_records'] * meta['thinning']} steps with "
            f"thinning {meta['thinning']}; remove it or pass another checkpoint_dir."
        )
    if stored.get("fingerprint") != meta["fingerprint"]:
        raise ValueError(
            f"checkpoint {path} belongs to another run: the model, its data, the settings or the "
            "seed differ from this one's, so resuming would return another run's draws. Remove "
            f"{path.parent} or pass another checkpoint_dir."
        )


def checkpoint_exists(checkpoint_dir: str | os.PathLike | None) -> bool:
    """Whether ``checkpoint_dir`` holds a checkpoint that :func:`run` would resume from (with
    several processes: one every process holds; a collective call)."""
    if checkpoint_dir is None:
        return False
    stored = _read_meta(_process_directory(checkpoint_dir))
    return _agreed_done(0 if stored is None else stored["done"]) > 0


def load_state(checkpoint_dir: str | os.PathLike, like: PyTree) -> PyTree:
    """The state saved in ``checkpoint_dir`` (this process's, with several), with the structure
    and dtypes of ``like`` (e.g. the initial state): the last good state of a run that
    stopped."""
    directory = _process_directory(checkpoint_dir)
    stored = _read_meta(directory)
    if stored is None:
        raise ValueError(f"no checkpoint in {directory}.")
    return _read_arrays(directory / stored["state"], like, as_jax=True)
