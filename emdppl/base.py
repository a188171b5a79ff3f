"""The one shape every inference algorithm has: a pair of pure functions.

Like blackjax's ``SamplingAlgorithm`` and optax's ``GradientTransformation``, an
:class:`Algorithm` is a value, not an object with hidden state::

    state = algorithm.init(position, rng_key)
    state, info = algorithm.step(rng_key, state)

MCMC, SVI and EM distillation each build one, and :func:`emdppl.run` drives any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PRNGKey = jax.Array
PyTree = Any

__all__ = ["Algorithm", "PRNGKey", "PyTree", "as_key", "tree_all_finite"]


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
    """Return a typed JAX PRNG key from an int seed, a raw ``uint32[2]`` key or a typed key."""
    if isinstance(rng_key, int):
        return jax.random.key(rng_key)
    rng_key = jax.numpy.asarray(rng_key) if not hasattr(rng_key, "dtype") else rng_key
    if jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return rng_key
    if rng_key.shape == (2,) and rng_key.dtype == jax.numpy.uint32:
        return jax.random.wrap_key_data(rng_key)
    raise TypeError(
        f"rng_key must be an int seed or a JAX PRNG key, got {type(rng_key).__name__} "
        f"with shape {getattr(rng_key, 'shape', None)}; pass e.g. rng_key=0 or jax.random.key(0)."
    )


def tree_all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every inexact leaf of ``tree`` is finite (integer leaves are ignored)."""
    leaves = [
        jax.numpy.all(jax.numpy.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jax.numpy.issubdtype(jax.numpy.result_type(x), jax.numpy.inexact)
    ]
    return jax.numpy.all(jax.numpy.stack(leaves)) if leaves else jax.numpy.asarray(True)
