"""The one shape every inference algorithm has: a pair of pure functions.

Like blackjax's ``SamplingAlgorithm`` and optax's ``GradientTransformation``, an
:class:`Algorithm` is a value, not an object with hidden state::

    state = algorithm.init(position, rng_key)
    state, info = algorithm.step(rng_key, state)

MCMC, SVI and EM distillation each build one, and :func:`emdppl.run` drives any of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

PRNGKey = jax.Array
PyTree = Any

__all__ = [
    "Algorithm",
    "PRNGKey",
    "PyTree",
    "as_key",
    "caller_stacklevel",
    "tree_all_finite",
    "tree_where",
]


class Algorithm(NamedTuple):
    """A pure ``(init, step)`` pair.

    Attributes
    ----------
    init
        ``init(position, rng_key) -> state``.
    step
        ``step(rng_key, state) -> (state, info)``; ``state`` and ``info`` are pytrees.
    """

    init: Callable[[PyTree, PRNGKey], PyTree]
    step: Callable[[PRNGKey, PyTree], tuple[PyTree, PyTree]]


def as_key(rng_key: int | jax.Array) -> jax.Array:
    """Return a typed JAX PRNG key from an int seed (Python or NumPy integer), a raw
    ``uint32[2]`` key or a typed key; anything else is a ``TypeError`` saying what to pass."""
    if isinstance(rng_key, (int, np.integer)) and not isinstance(rng_key, bool):
        return jax.random.key(int(rng_key))
    if isinstance(rng_key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
            return rng_key
        if rng_key.shape == (2,) and rng_key.dtype == np.uint32:
            return jax.random.wrap_key_data(rng_key)
        if rng_key.shape == () and np.issubdtype(rng_key.dtype, np.integer):
            return jax.random.key(int(rng_key))
    raise TypeError(
        f"rng_key must be an int seed or a JAX PRNG key, got {type(rng_key).__name__}"
        f"{f' with shape {rng_key.shape}' if hasattr(rng_key, 'shape') else f' {rng_key!r}'}; "
        "pass e.g. rng_key=0 or jax.random.key(0)."
    )


def caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` that points at the first frame outside emdppl (the
    user's line), however deep inside the package the warning is raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_FRAMES
        or frame.f_code.co_filename.startswith("<")
    ):
        frame, level = frame.f_back, level + 1
    return level


#: Packages whose frames stand between a user's call and an emdppl warning (tracing, handlers).
_LIBRARY_FRAMES = frozenset(
    {"emdppl", "dataclasses", "jax", "jaxlib", "equinox", "numpyro", "contextlib", "functools"}
)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every inexact leaf of ``tree`` is finite (integer leaves are ignored)."""
    leaves = [
        jax.numpy.all(jax.numpy.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)
    ]
    return jax.numpy.all(jax.numpy.stack(leaves)) if leaves else jax.numpy.asarray(True)


def tree_where(condition: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where the scalar (or broadcastable) ``condition`` holds, else ``old``, leaf by
    leaf (``new`` and ``old`` of one structure)."""
    return jax.tree.map(lambda a, b: jax.numpy.where(condition, a, b), new, old)
