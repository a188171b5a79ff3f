"""``infer``: one call for every inference algorithm, one output type (ArviZ).

The model becomes a :class:`~emdppl.problem.Problem` and each algorithm's
``infer(problem, *, rng_key, progress_bar)`` runs on it; SVI on a Pyro model runs Pyro's own
SVI (torch optimiser, Pyro autoguides). What the algorithm returns is completed, in one place
for every algorithm and backend, by :func:`emdppl.inference_data.add_model_groups`
(``log_likelihood``, ``observed_data``, ``constant_data``, predictive groups, plate dims).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from emdppl.base import PRNGKey, as_key
from emdppl.inference_data import add_model_groups
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
    static: str | Sequence[str] = (),
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
    progress_bar: bool = True,
    backend: str | None = None,
    posterior_predictive: bool = False,
    prior: bool = False,
    num_prior_draws: int = 500,
    dims: Mapping[str, Sequence[str | None]] | None = None,
    coords: Mapping[str, Any] | None = None,
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
        Arguments of the model; arrays (and lists of numbers, turned into arrays) among them
        are traced, so a second call on new data of the same shapes reuses the compiled code.
    static
        Names of the arguments a NumPyro model uses as Python values (``len(np.unique(dept))``,
        ``int(np.max(y))``): compile-time constants, reaching the model as given (NumPyro's
        ``jit_model_args=False`` for those), an equal data set reusing the compiled code. Left
        empty, a model that needs concrete data runs with all its array arguments static and a
        warning that names them.
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
    posterior_predictive
        Add ``posterior_predictive``: the observed sites simulated at every posterior draw
        (``numpyro.infer.Predictive``; ``pyro.infer.Predictive`` for a Pyro model).
    prior, num_prior_draws
        Add ``prior`` (latent and deterministic sites) and ``prior_predictive`` (observed
        sites), ``num_prior_draws`` draws from the model's prior, one chain.
    dims, coords
        As ``az.from_numpyro(dims=, coords=)``: ``{var: [dim, ...]}`` names the axes of a
        variable after ``(chain, draw)`` in every group (overriding the plate names),
        ``{dim: values}`` labels a dim (default: integers).

    Returns
    -------
    arviz.InferenceData
        (an ``xarray.DataTree`` under arviz >= 1). ``posterior``: the sites of the model as
        written, latent sites on their constrained scale and deterministic sites, dims
        ``(chain, draw, ...)`` named after plates (``theta: (chain, draw, J)``, other axes
        ``<name>_dim_<i>``); ``unconstrained_posterior``: the auxiliary form's own sites
        (``theta_decentered``, ...); ``log_likelihood``: pointwise, one variable per observed
        site, ``(chain, draw, *obs_batch_dims)`` (left out, with a warning, when discrete sites
        are enumerated: those are summed out and not in the posterior); ``observed_data``;
        ``constant_data`` (array arguments that are not observations); ``sample_stats`` where
        the algorithm has them (MCMC: ``lp``, ``acceptance_rate``, ``diverging``,
        ``step_size``, ``n_steps``, ``energy`` where the kernel has them, and
        ``n_grad_evals``); the algorithm's own groups (``svi_trace``, ``estep_posterior``);
        the groups asked for above. SVI and EMD split their independent draws into
        ``num_chains`` chains. ``attrs``: ``created_at``,
        ``inference_library="emdppl"``, ``inference_library_version``, ``algorithm``,
        ``backend``, tuned parameters, timings, versions. A :class:`~emdppl.Target` has no
        model: its posterior is what its ``postprocess_fn`` returns, with ``sample_stats``.

    Examples
    --------
    >>> data = dict(sigma=s, y=y)
    >>> idata = emdppl.infer(eight_schools, "nuts", model_kwargs=data)  # doctest: +SKIP
    >>> az.summary(idata, var_names=["mu", "tau"])  # doctest: +SKIP
    >>> idata = emdppl.infer(eight_schools, emdppl.SVI(), model_kwargs=data,
    ...                      posterior_predictive=True, coords={"J": names})  # doctest: +SKIP
    >>> az.loo(idata), az.plot_ppc(idata)  # doctest: +SKIP
    """
    if isinstance(algorithm, str):
        algorithm = MCMC(algorithm)
    if not hasattr(algorithm, "infer"):
        raise TypeError(
            f"algorithm must be a sampler name, emdppl.MCMC, emdppl.SVI or emdppl.EMD, got "
            f"{type(algorithm).__name__}."
        )
    _check_output_options(num_prior_draws, dims, coords)
    problem = Problem.of(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        auxiliary=auxiliary,
        backend=backend,
        static=static,
    )
    if problem.backend == "target" and (posterior_predictive or prior):
        raise ValueError(
            "posterior_predictive=True and prior=True need a model's observed sites; a Target is "
            "only a log density. Pass the NumPyro or Pyro model instead."
        )
    if problem.backend == "pyro" and isinstance(algorithm, SVI):  # Pyro's own SVI and optimiser
        from emdppl.bridge.pyro_svi import pyro_svi_infer

        idata = pyro_svi_infer(
            problem.model,
            algorithm,
            model_args=problem.model_args,
            model_kwargs=problem.model_kwargs,
            rng_key=rng_key,
            auxiliary=problem.auxiliary,
            progress_bar=progress_bar,
        )
    else:
        idata = algorithm.infer(problem, rng_key=rng_key, progress_bar=progress_bar)
    return add_model_groups(
        idata,
        problem,
        rng_key=jax.random.fold_in(as_key(rng_key), 1),  # the algorithm's own key is rng_key
        posterior_predictive=posterior_predictive,
        prior=prior,
        num_prior_draws=num_prior_draws,
        dims=dims,
        coords=coords,
    )


def _check_output_options(num_prior_draws: Any, dims: Any, coords: Any) -> None:
    """Refuse bad ``num_prior_draws``, ``dims`` and ``coords`` before anything runs."""
    if not isinstance(num_prior_draws, (int, np.integer)) or num_prior_draws < 1:
        raise ValueError(f"num_prior_draws must be an integer >= 1, got {num_prior_draws!r}.")
    if dims is not None:
        if not isinstance(dims, Mapping) or any(
            isinstance(v, str) or not isinstance(v, Sequence) for v in dims.values()
        ):
            raise TypeError(
                f"dims must map variable names to lists of dim names, e.g. "
                f"dims={{'theta': ['school']}}, got {dims!r}."
            )
    if coords is not None and not isinstance(coords, Mapping):
        raise TypeError(
            f"coords must map dim names to values, e.g. coords={{'school': names}}, got {coords!r}."
        )
