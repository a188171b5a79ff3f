"""``infer``: one call for every inference algorithm, one output type (ArviZ).

The model becomes a :class:`~emdppl.problem.Problem` and each algorithm's
``infer(problem, *, rng_key, progress_bar)`` runs on it; SVI on a Pyro model runs Pyro's own
SVI (torch optimiser, Pyro autoguides).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emdppl.base import PRNGKey
from emdppl.mcmc import MCMC
from emdppl.problem import Problem
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
        :func:`emdppl.bridge.is_pyro_model`: its code refers to ``pyro``; needs
        ``pip install 'emdppl[pyro]'``), or a :class:`~emdppl.Target`.
    algorithm
        A sampler name (shorthand for ``emdppl.MCMC(name)``), an :class:`~emdppl.MCMC`,
        :class:`~emdppl.SVI` or :class:`~emdppl.EMD`, or any object with an
        ``infer(problem, *, rng_key, progress_bar)`` method taking a :class:`Problem`.
    model_args, model_kwargs
        Arguments of the model; arrays among them are traced, so a second call on new data of
        the same shapes reuses the compiled code.
    rng_key
        An int seed or a JAX key.
    auxiliary
        Run on the auxiliary (non-centered) form of the model.
    progress_bar
        Show tqdm progress bars.
    backend
        ``"numpyro"`` or ``"pyro"`` to say what ``model`` is; ``None`` recognises it. A Pyro
        model is put in auxiliary form by Pyro's own reparam handlers and its log density reaches
        the JAX samplers (and EMD) through :mod:`emdppl.bridge`; ``emdppl.SVI`` on a Pyro model
        runs Pyro's own SVI (:func:`emdppl.bridge.pyro_svi_infer`).

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
    problem = Problem.of(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        auxiliary=auxiliary,
        backend=backend,
    )
    if problem.backend == "pyro" and isinstance(algorithm, SVI):  # Pyro's own SVI and optimiser
        from emdppl.bridge.pyro_svi import pyro_svi_infer

        return pyro_svi_infer(
            problem.model,
            algorithm,
            model_args=problem.model_args,
            model_kwargs=problem.model_kwargs,
            rng_key=rng_key,
            auxiliary=problem.auxiliary,
            progress_bar=progress_bar,
        )
    return algorithm.infer(problem, rng_key=rng_key, progress_bar=progress_bar)
