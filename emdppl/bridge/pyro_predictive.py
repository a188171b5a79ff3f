r"""What a Pyro model gives ArviZ besides the posterior, by Pyro's own machinery on the host.

The twin of :mod:`emdppl.predictive`: :func:`pyro_model_data` reads one ``poutine.trace`` of the
model as written (and of its auxiliary form); :func:`pyro_log_likelihood` is the pointwise
:math:`\log p(y_i \mid \theta)` of every observed site at each draw, from one trace of the model
conditioned on all draws at once (``pyro.infer.Predictive(...).get_vectorized_trace``: an
outermost plate over draws); :func:`pyro_posterior_predictive` and :func:`pyro_prior` simulate
the observed sites with ``pyro.infer.Predictive`` on ``poutine.uncondition(model)``. A model
whose batch dims are not all annotated by plates cannot be vectorised that way; it is then run
once per draw (``poutine.condition``).

Arrays come in and go out as numpy, with leading ``(chain, draw)`` axes; torch runs in the
dtype of the model's tensors (like the bridge's log density: :func:`~emdppl.bridge.pyro_model.
model_dtype`) and results are returned in the draws' dtype. Like the rest of
:mod:`emdppl.bridge`, torch and pyro are imported inside the functions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from emdppl.bridge.pyro_model import (
    auxiliary_pyro,
    latent_sites,
    model_dtype,
    require_pyro,
    to_torch_args,
    trace_model,
)
from emdppl.predictive import ModelData, plate_dims

__all__ = [
    "pyro_log_likelihood",
    "pyro_model_data",
    "pyro_posterior_predictive",
    "pyro_prior",
]


#: What a model whose batch dims are not all in plates raises when vectorised over draws.
_NOT_VECTORISED = (RuntimeError, ValueError, IndexError)


def _is_deterministic(site: dict) -> bool:
    return bool(site.get("infer", {}).get("_deterministic"))


def _observed_sites(trace: Any) -> dict:
    from pyro.distributions import Unit
    from pyro.poutine.subsample_messenger import _Subsample

    return {
        k: s
        for k, s in trace.nodes.items()
        if s["type"] == "sample"
        and s["is_observed"]
        and not _is_deterministic(s)
        and not isinstance(s["fn"], (Unit, _Subsample))
    }


def _site_dims(site: dict) -> tuple[str | None, ...]:
    shape = tuple(site["value"].shape)
    # pyro.deterministic puts every axis in the event; like NumPyro's, its axes count as batch
    event_ndim = 0 if _is_deterministic(site) else len(site["fn"].event_shape)
    plates = [(f.name, f.dim, f.size) for f in site["cond_indep_stack"] if f.vectorized]
    return plate_dims(shape, event_ndim, plates)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy()


def pyro_model_data(
    model: Callable, model_args: tuple, model_kwargs: dict, auxiliary: bool
) -> ModelData:
    """Read one trace of the Pyro ``model`` (and of its auxiliary form when ``auxiliary``);
    the :class:`~emdppl.predictive.ModelData` of :func:`emdppl.predictive.model_data`."""
    require_pyro()
    args, kwargs = to_torch_args(tuple(model_args), dict(model_kwargs))
    trace = trace_model(model, args, kwargs, 0)
    sampled = trace_model(auxiliary_pyro(model), args, kwargs, 0) if auxiliary else None
    dims = {}
    for source in (sampled, trace):  # the model as written wins
        if source is None:
            continue
        named = {**latent_sites(source), **_observed_sites(source)}
        named.update({k: s for k, s in source.nodes.items() if _is_deterministic(s)})
        dims.update({k: _site_dims(s) for k, s in named.items()})
    return ModelData(
        latent=tuple(latent_sites(trace)),
        deterministic=tuple(k for k, s in trace.nodes.items() if _is_deterministic(s)),
        observed={k: _numpy(s["value"]) for k, s in _observed_sites(trace).items()},
        dims=dims,
    )


def _flat_draws(latents: dict, torch_dtype: Any) -> tuple[dict, tuple[int, int], Any]:
    """``{site: (chain, draw, ...)}`` numpy to ``{site: (chain * draw, ...)}`` torch tensors in
    ``torch_dtype`` (the model's), with the ``(chain, draw)`` shape and the draws' dtype."""
    import torch

    first = np.asarray(next(iter(latents.values())))
    batch = first.shape[:2]
    flat = {
        k: torch.as_tensor(np.asarray(v).reshape(-1, *np.shape(v)[2:]), dtype=torch_dtype)
        for k, v in latents.items()
    }
    return flat, batch, first.dtype


def _unflatten(value: Any, batch: tuple[int, int], shape: tuple, dtype: Any) -> np.ndarray:
    """A vectorised result ``(n, 1, ..., *shape)`` (or broadcastable to it) as ``(*batch,
    *shape)`` numpy in ``dtype`` (floats) or as it is."""
    n = math.prod(batch)
    value = value.reshape(value.shape[0], -1)
    if value.shape[1] != math.prod(shape):
        raise ValueError(f"shape {tuple(value.shape)} does not hold draws of shape {shape}")
    value = _numpy(value.expand(n, -1)).reshape(*batch, *shape)
    return value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value


def _batch_shapes(model: Callable, args: tuple, kwargs: dict) -> dict[str, tuple[int, ...]]:
    trace = trace_model(model, args, kwargs, 0)
    return {k: tuple(s["fn"].batch_shape) for k, s in _observed_sites(trace).items()}


def pyro_log_likelihood(
    model: Callable, latents: dict, model_args: tuple, model_kwargs: dict
) -> dict[str, np.ndarray]:
    r"""Pointwise :math:`\log p(y \mid \theta)` of every observed site at every draw.

    Parameters
    ----------
    model, model_args, model_kwargs
        The Pyro model as written and its arguments.
    latents
        ``{site: array (chain, draw, *site_shape)}``, every latent site on its constrained
        scale.

    Returns
    -------
    dict
        ``{observed site: array (chain, draw, *batch_shape)}`` (summed over event dims only).
    """
    torch, pyro = require_pyro()
    from pyro import poutine
    from pyro.infer import Predictive

    args, kwargs = to_torch_args(tuple(model_args), dict(model_kwargs))
    flat, batch, dtype = _flat_draws(latents, model_dtype(model, args, kwargs))
    shapes = _batch_shapes(model, args, kwargs)

    def one(draw: dict) -> dict:
        trace = poutine.trace(poutine.condition(model, draw)).get_trace(*args, **kwargs)
        sites = _observed_sites(trace)
        return {k: sites[k]["fn"].log_prob(sites[k]["value"]) for k in shapes}

    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            trace = Predictive(model, posterior_samples=flat).get_vectorized_trace(*args, **kwargs)
            sites = _observed_sites(trace)
            return {
                k: _unflatten(sites[k]["fn"].log_prob(sites[k]["value"]), batch, shape, dtype)
                for k, shape in shapes.items()
            }
        except _NOT_VECTORISED:
            rows = [one({k: v[i] for k, v in flat.items()}) for i in range(math.prod(batch))]
            return {
                k: _unflatten(torch.stack([r[k] for r in rows]), batch, shape, dtype)
                for k, shape in shapes.items()
            }


def _predict(
    model: Callable,
    samples: dict,
    num_draws: int,
    sites: list[str],
    seed: int,
    args: tuple,
    kwargs: dict,
) -> dict:
    """``pyro.infer.Predictive`` of the unconditioned model, vectorised, else one draw at a time:
    ``{site: tensor (num_draws, ...)}``."""
    torch, pyro = require_pyro()
    from pyro import poutine
    from pyro.infer import Predictive

    def run(parallel: bool) -> dict:
        predictive = Predictive(
            poutine.uncondition(model),
            posterior_samples=samples or None,
            num_samples=None if samples else num_draws,
            return_sites=sites,
            parallel=parallel,
        )
        with poutine.seed(rng_seed=seed):
            return predictive(*args, **kwargs)

    with torch.no_grad(), pyro.validation_enabled(False):
        try:
            return run(parallel=True)
        except _NOT_VECTORISED:
            return run(parallel=False)


def pyro_posterior_predictive(
    model: Callable,
    latents: dict,
    observed: tuple[str, ...],
    seed: int,
    model_args: tuple,
    model_kwargs: dict,
) -> dict[str, np.ndarray]:
    """The ``observed`` sites simulated at each posterior draw: ``{site: array (chain, draw,
    *obs_shape)}``; ``latents`` as in :func:`pyro_log_likelihood`."""
    require_pyro()
    args, kwargs = to_torch_args(tuple(model_args), dict(model_kwargs))
    flat, batch, dtype = _flat_draws(latents, model_dtype(model, args, kwargs))
    trace = trace_model(model, args, kwargs, 0)
    draws = _predict(model, flat, math.prod(batch), list(observed), seed, args, kwargs)
    return {
        k: _unflatten(draws[k], batch, tuple(trace.nodes[k]["value"].shape), dtype)
        for k in observed
    }


def pyro_prior(
    model: Callable, num_draws: int, seed: int, model_args: tuple, model_kwargs: dict
) -> dict[str, np.ndarray]:
    """``num_draws`` prior draws of every latent, deterministic and observed site (observed
    ones simulated): ``{site: array (num_draws, *site_shape)}``."""
    require_pyro()
    args, kwargs = to_torch_args(tuple(model_args), dict(model_kwargs))
    trace = trace_model(model, args, kwargs, 0)
    names = [*latent_sites(trace), *_observed_sites(trace)]
    names += [k for k, s in trace.nodes.items() if _is_deterministic(s)]
    draws = _predict(model, {}, num_draws, names, seed, args, kwargs)
    return {
        k: _unflatten(draws[k], (1, num_draws), tuple(trace.nodes[k]["value"].shape), np.float32)[0]
        for k in names
    }
