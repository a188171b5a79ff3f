"""Wall-clock and compilation time of a block, from JAX's own monitoring events."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax

__all__ = ["Stopwatch", "seconds_per_10k", "stopwatch"]

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_total = [0.0]


def _listener(event: str, duration: float, **kwargs: object) -> None:
    if event in _COMPILE_EVENTS:
        _compile_total[0] += duration


jax.monitoring.register_event_duration_secs_listener(_listener)


class Stopwatch:
    """``wall_seconds`` and ``compile_seconds`` (tracing, lowering, XLA compilation) of a block."""

    wall_seconds: float = 0.0
    compile_seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Time a block; tracing and compiling inside it are counted in ``compile_seconds``.

    Examples
    --------
    >>> with stopwatch() as sw:
    ...     jax.jit(lambda x: x + 1)(1.0)  # doctest: +SKIP
    >>> sw.compile_seconds <= sw.wall_seconds  # doctest: +SKIP
    True
    """
    watch = Stopwatch()
    compile_start, start = _compile_total[0], time.perf_counter()
    try:
        yield watch
    finally:
        watch.wall_seconds = time.perf_counter() - start
        watch.compile_seconds = _compile_total[0] - compile_start


def seconds_per_10k(sample_fn: Callable[[Any], Any], rng_key: Any) -> float:
    """Wall seconds of a warm call of ``sample_fn(rng_key) -> draws`` (10k of them, by the caller).

    A first call on ``rng_key`` compiles; the timed call is on ``fold_in(rng_key, 1)``.
    """
    jax.block_until_ready(sample_fn(rng_key))  # compile
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(jax.random.fold_in(rng_key, 1)))
    return time.perf_counter() - start
