"""``Problem``: the one way from a model to what the algorithms work on.

A NumPyro model, a Pyro model or a ready :class:`~emdppl.target.Target`, with its arguments and
form. ``problem.target(num_chains, rng_key)`` gives the :class:`~emdppl.target.Target` of every
backend (the Pyro one through :mod:`emdppl.bridge`); this module is the only one that tells
backends apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from emdppl.base import PRNGKey
from emdppl.target import Target, check_model_arguments

__all__ = ["BACKENDS", "Problem"]

BACKENDS = ("numpyro", "pyro", "target")


def _is_pyro(model: Any) -> bool:
    from emdppl.bridge.pyro_model import is_pyro_model

    return is_pyro_model(model)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model with its arguments, form and backend.

    Attributes
    ----------
    model
        A NumPyro model, a Pyro model, or a :class:`~emdppl.target.Target` (backend
        ``"target"``).
    model_args, model_kwargs
        The model's arguments; arrays among them are traced, so a second call on new data of
        the same shapes reuses the compiled code.
    auxiliary
        Run on the auxiliary (non-centered) form: :func:`emdppl.auxiliary` for NumPyro, Pyro's
        reparam handlers for Pyro; ignored for a Target.
    backend
        ``"numpyro"``, ``"pyro"`` or ``"target"``.

    Examples
    --------
    >>> problem = emdppl.Problem.of(eight_schools, model_kwargs=data)  # doctest: +SKIP
    >>> target = problem.target(num_chains=4, rng_key=jax.random.key(0))  # doctest: +SKIP
    """

    model: Callable | Target
    model_args: tuple = ()
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    auxiliary: bool = True
    backend: str = "numpyro"

    @classmethod
    def of(
        cls,
        model: Callable | Target,
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        auxiliary: bool = True,
        backend: str | None = None,
    ) -> Problem:
        """Check the arguments and recognise the backend (``backend=None``): a Target, a Pyro
        model (its code refers to ``pyro``, :func:`emdppl.bridge.is_pyro_model`) or NumPyro."""
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}.")
        if not isinstance(model_args, tuple):
            raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}.")
        if backend not in (None, "numpyro", "pyro"):
            raise ValueError(f"backend must be None, 'numpyro' or 'pyro', got {backend!r}.")
        if isinstance(model, Target):
            backend = "target"
        elif not callable(model):
            raise TypeError(
                f"model must be a NumPyro or Pyro model (a callable) or an emdppl.Target, got "
                f"{type(model).__name__}."
            )
        elif backend is None:
            backend = "pyro" if _is_pyro(model) else "numpyro"
        model_kwargs = dict(model_kwargs or {})
        if backend != "target":
            check_model_arguments(model, model_args, model_kwargs)
        return cls(model, model_args, model_kwargs, bool(auxiliary), backend)

    @property
    def is_auxiliary(self) -> bool:
        """Whether the algorithms see the auxiliary form (never for a Target)."""
        return self.auxiliary and self.backend != "target"

    def target(self, num_chains: int, rng_key: int | PRNGKey) -> Target:
        """The :class:`~emdppl.target.Target` with ``num_chains`` initial positions.

        A Target problem is returned as it is: its ``initial_position`` sets the chains (as in
        :meth:`emdppl.MCMC.sample`).
        """
        if self.backend == "target":
            return self.model
        if self.backend == "pyro":
            from emdppl.bridge.pyro_target import target_from_pyro

            build = target_from_pyro
        else:
            build = Target.from_numpyro
        return build(
            self.model,
            model_args=self.model_args,
            model_kwargs=self.model_kwargs,
            num_chains=num_chains,
            rng_key=rng_key,
            auxiliary=self.auxiliary,
        )
