"""``infer``: one call for every inference algorithm, one output type (ArviZ)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from emdppl.base import PRNGKey, as_key
from emdppl.mcmc import MCMC
from emdppl.svi import SVI
from emdppl.target import Target

__all__ = ["infer"]


def infer(
    model: Callable | Target,
    algorithm: Any = "nuts",
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
    progress_bar: bool = True,
    backend: str | None = None,
) -> Any:
    """Infer the posterior of ``model`` with ``algorithm`` and return ``arviz.InferenceData``.

    Parameters
    ----------
    model
        A NumPyro model (written centered or not), a Pyro model (recognised by
        :func:`emdppl.pyro.is_pyro_model`: its code refers to ``pyro``; needs
        ``pip install 'emdppl[pyro]'``), or a :class:`~emdppl.Target`.
    algorithm
        A sampler name (shorthand for ``emdppl.MCMC(name)``), an :class:`~emdppl.MCMC`, or any
        algorithm object with an ``infer(model, *, model_args, model_kwargs, rng_key, auxiliary,
        progress_bar)`` method (``emdppl.SVI``, ``emdppl.EMD``).
    model_args, model_kwargs
        Arguments of the model; arrays among them are traced, so a second call on new data of
        the same shapes reuses the compiled code.
    rng_key
        An int seed or a JAX key.
    auxiliary
        Run on :func:`emdppl.auxiliary` (non-centered) form of the model.
    progress_bar
        Show tqdm progress bars.
    backend
        ``"numpyro"`` or ``"pyro"`` to say what ``model`` is; ``None`` recognises it. A Pyro
        model is put in auxiliary form by Pyro's own reparam handlers and its log density reaches
        the JAX samplers through :mod:`emdppl.bridge`; ``emdppl.SVI`` on a Pyro model runs
        Pyro's own SVI (:func:`emdppl.pyro.pyro_svi_infer`).

    Returns
    -------
    arviz.InferenceData
        ``posterior``: every model site on its constrained scale and the deterministic sites,
        dims ``(chain, draw, ...)``; ``sample_stats`` (``lp``, ``acceptance_rate``,
        ``diverging``, ``step_size``, ``n_steps``, ``energy`` where the kernel has them, and
        ``n_grad_evals``); ``attrs``: algorithm, tuned parameters, timings, versions.

    Examples
    --------
    >>> data = dict(sigma=s, y=y)
    >>> idata = emdppl.infer(eight_schools, "nuts", model_kwargs=data)  # doctest: +SKIP
    >>> az.summary(idata, var_names=["mu", "tau"])  # doctest: +SKIP
    """
    if isinstance(algorithm, str):
        algorithm = MCMC(algorithm)
    if not hasattr(algorithm, "infer"):
        raise TypeError(
            f"algorithm must be a sampler name, emdppl.MCMC, emdppl.SVI or emdppl.EMD, got "
            f"{type(algorithm).__name__}."
        )
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}.")
    if not isinstance(model_args, tuple):
        raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}.")
    if backend not in (None, "numpyro", "pyro"):
        raise ValueError(f"backend must be None, 'numpyro' or 'pyro', got {backend!r}.")
    if backend == "pyro" or (backend is None and _is_pyro(model)):
        if isinstance(algorithm, SVI):  # Pyro's own SVI, torch optimiser
            from emdppl.pyro import pyro_svi_infer

            return pyro_svi_infer(
                model,
                algorithm,
                model_args=model_args,
                model_kwargs=model_kwargs,
                rng_key=rng_key,
                auxiliary=auxiliary,
                progress_bar=progress_bar,
            )
        model = _pyro_target(model, algorithm, model_args, model_kwargs, rng_key, auxiliary)
    return algorithm.infer(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        rng_key=rng_key,
        auxiliary=auxiliary,
        progress_bar=progress_bar,
    )


def _is_pyro(model: Any) -> bool:
    from emdppl.pyro import is_pyro_model

    return not isinstance(model, Target) and is_pyro_model(model)


def _pyro_target(
    model: Callable,
    algorithm: Any,
    model_args: tuple,
    model_kwargs: dict | None,
    rng_key: int | PRNGKey,
    auxiliary: bool,
) -> Target:
    """The bridged target of a Pyro model, for the MCMC algorithms (EMD does not take one yet)."""
    from emdppl.pyro import target_from_pyro

    if not isinstance(algorithm, MCMC):
        raise NotImplementedError(
            f"{type(algorithm).__name__} does not run Pyro models yet; use emdppl.MCMC (any "
            "registered sampler) or emdppl.SVI, or write the model in NumPyro."
        )
    return target_from_pyro(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_chains=algorithm.num_chains,
        rng_key=jax.random.fold_in(as_key(rng_key), 1),
        auxiliary=auxiliary,
    )
