"""``Problem``: the one way from a model to what the algorithms work on.

A NumPyro model, a Pyro model or a ready :class:`~emdppl.target.Target`, with its arguments and
form. ``problem.target(num_chains, rng_key)`` gives the :class:`~emdppl.target.Target` of every
backend (the Pyro one through :mod:`emdppl.bridge`); ``problem.model_data()``,
``problem.log_likelihood(latents)``, ``problem.posterior_predictive(...)`` and
``problem.prior(...)`` give what ArviZ needs besides the posterior, by :mod:`emdppl.predictive`
(NumPyro) or :mod:`emdppl.bridge.pyro_predictive` (Pyro's own machinery). This module is the
only one that tells backends apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from emdppl import predictive
from emdppl.base import PRNGKey, as_key, caller_stacklevel
from emdppl.predictive import ModelData
from emdppl.target import (
    StaticArguments,
    Target,
    check_model_arguments,
    check_static_names,
    numpyro_inputs,
)

__all__ = ["BACKENDS", "Problem"]

BACKENDS = ("numpyro", "pyro", "target")


def _as_numpy(value: Any) -> np.ndarray | None:
    """An array argument (numpy, JAX or torch) as numpy; ``None`` for anything else."""
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return None


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
        the same shapes reuses the compiled code. For a NumPyro model, the arguments it uses as
        Python values are bound into ``model`` (a :class:`~emdppl.target.StaticArguments`) by
        :meth:`of`, and lists of numbers are arrays.
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
        static: str | Sequence[str] = (),
    ) -> Problem:
        """Check the arguments and recognise the backend (``backend=None``): a Target, a Pyro
        model (its code refers to ``pyro``, :func:`emdppl.bridge.is_pyro_model`) or NumPyro.

        ``static`` names the arguments a NumPyro model uses as Python values, bound as
        compile-time constants (:func:`emdppl.target.numpyro_inputs`, which also makes them
        static, with a warning, when the model needs them and ``static`` is empty). A Pyro
        model runs eagerly and sees every argument as it is: ``static`` changes nothing there
        (its names are checked all the same).
        """
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
        if backend == "target" and static:
            raise ValueError(
                f"static={static!r} names model arguments; a Target has none (its data are "
                "closed over by its logdensity_fn already)."
            )
        if backend == "numpyro":
            model, model_args, model_kwargs = numpyro_inputs(
                model, model_args, model_kwargs, static
            )
        elif backend == "pyro":
            check_model_arguments(model, model_args, model_kwargs)
            check_static_names(model, model_args, model_kwargs, static)
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

    def _model_only(self, what: str) -> None:
        if self.backend == "target":
            raise ValueError(
                f"{what} needs a model's sample sites; a Target is only a log density. Pass the "
                "NumPyro or Pyro model to emdppl.infer instead."
            )

    def model_data(self) -> ModelData:
        """The model's sites, observations and axis names (from one trace of the model as
        written and of its auxiliary form): :class:`~emdppl.predictive.ModelData`."""
        self._model_only("model_data")
        if self.backend == "pyro":
            from emdppl.bridge.pyro_predictive import pyro_model_data

            return pyro_model_data(self.model, self.model_args, self.model_kwargs, self.auxiliary)
        data = predictive.model_data(self.model, self.model_args, self.model_kwargs, self.auxiliary)
        return data._replace(observed={k: np.asarray(v) for k, v in data.observed.items()})

    def constant_data(self, observed: dict[str, Any]) -> dict[str, np.ndarray]:
        """The model's array arguments that are not observations, by argument name.

        An argument is an observation when an observed site has its name or its value
        (``observed`` as in :meth:`model_data`).
        """
        self._model_only("constant_data")
        try:
            signature = inspect.signature(self.model)
            bound = signature.bind_partial(*self.model_args, **self.model_kwargs)
            arguments = dict(bound.arguments)
            for name, param in signature.parameters.items():
                if name in arguments and param.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name))
                elif name in arguments and param.kind is inspect.Parameter.VAR_POSITIONAL:
                    extra = arguments.pop(name)
                    arguments.update({f"{name}_{i}": v for i, v in enumerate(extra)})
        except (TypeError, ValueError):
            arguments = {f"arg_{i}": v for i, v in enumerate(self.model_args)}
            arguments.update(self.model_kwargs)
        if isinstance(self.model, StaticArguments):
            arguments.update(self.model.static)
        observations = [np.asarray(v) for v in observed.values()]
        out = {}
        for name, value in arguments.items():
            array = _as_numpy(value)
            if array is None or name in observed:
                continue
            if any(o.shape == array.shape and np.array_equal(o, array) for o in observations):
                continue
            out[name] = array
        return out

    def log_likelihood(self, latents: dict[str, Any]) -> dict[str, np.ndarray]:
        r"""Pointwise :math:`\log p(y \mid \theta)` of every observed site at every draw.

        Parameters
        ----------
        latents
            ``{site: array (chain, draw, *site_shape)}``: every latent site of the model as
            written, on its constrained scale.

        Returns
        -------
        dict
            ``{observed site: array (chain, draw, *batch_shape)}``.
        """
        self._model_only("log_likelihood")
        enumerated = self.model_data().enumerated if self.backend == "numpyro" else ()
        if enumerated:
            warnings.warn(
                f"no log_likelihood group: the discrete site(s) {list(enumerated)} are summed out "
                "(enumerated), and the pointwise log likelihood of the marginal model is not "
                "computed (a prior draw of them would give a wrong one).",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
            return {}
        if self.backend == "pyro":
            from emdppl.bridge.pyro_predictive import pyro_log_likelihood

            return pyro_log_likelihood(self.model, latents, self.model_args, self.model_kwargs)
        out = predictive.log_likelihood(self.model, latents, self.model_args, self.model_kwargs)
        return {k: np.asarray(v) for k, v in out.items()}

    def posterior_predictive(
        self, latents: dict[str, Any], observed: tuple[str, ...], rng_key: int | PRNGKey
    ) -> dict[str, np.ndarray]:
        """The ``observed`` sites simulated at each draw of ``latents`` (as in
        :meth:`log_likelihood`): ``{site: array (chain, draw, *obs_shape)}``."""
        self._model_only("posterior_predictive")
        if self.backend == "pyro":
            from emdppl.bridge.pyro_predictive import pyro_posterior_predictive
            from emdppl.bridge.pyro_target import torch_seed

            return pyro_posterior_predictive(
                self.model,
                latents,
                tuple(observed),
                torch_seed(rng_key),
                self.model_args,
                self.model_kwargs,
            )
        out = predictive.posterior_predictive(
            self.model,
            latents,
            tuple(observed),
            as_key(rng_key),
            self.model_args,
            self.model_kwargs,
        )
        return {k: np.asarray(v) for k, v in out.items()}

    def prior(self, num_draws: int, rng_key: int | PRNGKey) -> dict[str, np.ndarray]:
        """``num_draws`` prior draws of every latent, deterministic and observed site (observed
        sites simulated): ``{site: array (num_draws, *site_shape)}``."""
        self._model_only("prior")
        if self.backend == "pyro":
            from emdppl.bridge.pyro_predictive import pyro_prior
            from emdppl.bridge.pyro_target import torch_seed

            return pyro_prior(
                self.model, num_draws, torch_seed(rng_key), self.model_args, self.model_kwargs
            )
        out = predictive.prior(
            self.model, int(num_draws), as_key(rng_key), self.model_args, self.model_kwargs
        )
        return {k: np.asarray(v) for k, v in out.items()}
