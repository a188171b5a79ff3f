"""``infer``: one call for every inference algorithm, one output type (ArviZ)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from emdppl.base import PRNGKey
from emdppl.mcmc import MCMC
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
) -> Any:
    """Infer the posterior of ``model`` with ``algorithm`` and return ``arviz.InferenceData``.

    Parameters
    ----------
    model
        A NumPyro model (written centered or not), or a :class:`~emdppl.Target`.
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
    return algorithm.infer(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        rng_key=rng_key,
        auxiliary=auxiliary,
        progress_bar=progress_bar,
    )
