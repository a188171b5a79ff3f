r"""What a NumPyro model gives ArviZ besides the posterior: sites, plates, data, predictions.

:func:`model_data` reads one trace of the model as written (and of its auxiliary form): which
sites are latent, deterministic and observed, the observations, and the names of each site's
axes from the plates it sits in (:func:`plate_dims`, as ``az.from_numpyro`` names them).
:func:`log_likelihood` is the pointwise :math:`\log p(y_i \mid \theta)` of every observed site
at each posterior draw (``numpyro.infer.util.log_likelihood``), :func:`posterior_predictive`
and :func:`prior` simulate the observed sites (``numpyro.infer.Predictive``). All run the model
as the user wrote it, conditioned on the constrained latent values: valid for the auxiliary
form too, whose posterior holds the centered sites as deterministics.

Each function is an ``equinox.filter_jit``: a second call on data of the same shapes reuses
the compiled code and does not run the model again. The Pyro twin is
:mod:`emdppl.bridge.pyro_predictive`; :class:`emdppl.problem.Problem` chooses between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions.distribution import Unit
from numpyro.infer import Predictive
from numpyro.infer.initialization import init_to_sample
from numpyro.infer.util import log_likelihood as numpyro_log_likelihood
from numpyro.primitives import Messenger

from emdppl.base import PRNGKey
from emdppl.reparam import auxiliary as make_auxiliary
from emdppl.target import is_enumerated

__all__ = [
    "ModelData",
    "log_likelihood",
    "model_data",
    "plate_dims",
    "posterior_predictive",
    "prior",
]

#: Axis names of one site's value, ``None`` where no plate names the axis.
Dims = tuple[str | None, ...]


class ModelData(NamedTuple):
    """The sites of a model as written, its observations and the names of its sites' axes.

    Attributes
    ----------
    latent
        Latent sample sites, in the order the model samples them.
    deterministic
        ``numpyro.deterministic`` (``pyro.deterministic``) sites.
    observed
        ``{site: array (*obs_shape)}``, the observations (``numpyro.factor`` sites excluded).
    enumerated
        Discrete latent sites marked ``infer={"enumerate": "parallel"}``: summed out of the
        log density, so not in ``latent`` (nor in the posterior).
    dims
        ``{site: Dims}`` for the sites of the model as written and of its auxiliary form (the
        former win): axis names from plates and ``infer={"event_dims": [...]}``.
    """

    latent: tuple[str, ...]
    deterministic: tuple[str, ...]
    observed: dict[str, Any]
    dims: dict[str, Dims]
    enumerated: tuple[str, ...] = ()


def plate_dims(
    shape: tuple[int, ...],
    event_ndim: int,
    plates: Iterable[tuple[str, int | None, int]],
    event_names: Iterable[str] = (),
) -> Dims:
    """The names of a site's axes (without chain and draw) from the plates it sits in.

    A plate ``(name, dim, size)`` with ``dim < 0`` names batch axis ``len(batch_shape) + dim``
    of ``shape = batch_shape + event_shape`` when that axis has the plate's size (a sequential
    plate, ``dim=None``, names none); the event axes take ``event_names`` in order (ArviZ's
    ``infer={"event_dims": [...]}``). Other axes are ``None``.

    Examples
    --------
    >>> plate_dims((3, 8), 0, [("J", -1, 8)])
    (None, 'J')
    """
    names: list[str | None] = [None] * len(shape)
    batch_ndim = len(shape) - event_ndim
    for name, dim, size in plates:
        if dim is None:
            continue
        axis = batch_ndim + dim
        if 0 <= axis < batch_ndim and shape[axis] == size:
            names[axis] = name
    for axis, name in zip(range(batch_ndim, len(shape)), event_names, strict=False):
        names[axis] = name
    return tuple(names)


def _site_dims(site: dict) -> Dims:
    shape = tuple(np.shape(site["value"]))
    event_ndim = len(site["fn"].event_shape) if site["type"] == "sample" else 0
    plates = [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]]
    return plate_dims(shape, event_ndim, plates, site.get("infer", {}).get("event_dims", ()))


def _trace(model: Callable, model_args: tuple, model_kwargs: dict) -> dict:
    # init_to_sample draws ImproperUniform sites, which cannot be sampled (as az.from_numpyro)
    seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_sample)
    return handlers.trace(seeded).get_trace(*model_args, **model_kwargs)


def _is_observed(site: dict) -> bool:
    return site["type"] == "sample" and site["is_observed"] and not isinstance(site["fn"], Unit)


@eqx.filter_jit
def model_data(
    model: Callable, model_args: tuple, model_kwargs: dict, auxiliary: bool
) -> ModelData:
    """Read one trace of ``model`` (and of ``emdppl.auxiliary(model)`` when ``auxiliary``).

    Returns
    -------
    ModelData
    """
    with numpyro.validation_enabled(False):
        trace = _trace(model, model_args, model_kwargs)
        sampled = _trace(make_auxiliary(model), model_args, model_kwargs) if auxiliary else {}
    named = ("sample", "deterministic")
    dims = {k: _site_dims(s) for k, s in {**sampled, **trace}.items() if s["type"] in named}
    enumerated = tuple(k for k, s in trace.items() if is_enumerated(s))
    return ModelData(
        latent=tuple(
            k
            for k, s in trace.items()
            if s["type"] == "sample" and not s["is_observed"] and k not in enumerated
        ),
        deterministic=tuple(k for k, s in trace.items() if s["type"] == "deterministic"),
        observed={k: s["value"] for k, s in trace.items() if _is_observed(s)},
        dims=dims,
        enumerated=enumerated,
    )


@eqx.filter_jit
def log_likelihood(
    model: Callable, latents: dict, model_args: tuple, model_kwargs: dict
) -> dict[str, jax.Array]:
    r"""Pointwise :math:`\log p(y \mid \theta)` of every observed site at every draw.

    Parameters
    ----------
    model, model_args, model_kwargs
        The model as written and its arguments.
    latents
        ``{site: array (chain, draw, *site_shape)}``, every latent site of ``model`` on its
        constrained scale.

    Returns
    -------
    dict
        ``{observed site: array (chain, draw, *batch_shape)}`` (summed over event dims only).
    """
    return numpyro_log_likelihood(
        model, latents, *model_args, parallel=True, batch_ndims=2, **model_kwargs
    )


class _Unobserved(Messenger):
    """Draw the observed sites from their distribution (the observations dropped)."""

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and not isinstance(msg["fn"], Unit):
            msg["value"] = None
            msg["is_observed"] = False


@eqx.filter_jit
def posterior_predictive(
    model: Callable,
    latents: dict,
    observed: tuple[str, ...],
    rng_key: PRNGKey,
    model_args: tuple,
    model_kwargs: dict,
) -> dict[str, jax.Array]:
    """The ``observed`` sites simulated at each posterior draw.

    ``latents`` as in :func:`log_likelihood`; returns ``{site: array (chain, draw,
    *obs_shape)}``.
    """
    predictive = Predictive(
        _Unobserved(model),
        posterior_samples=latents,
        return_sites=list(observed),
        batch_ndims=2,
        parallel=True,
    )
    return predictive(rng_key, *model_args, **model_kwargs)


@eqx.filter_jit
def prior(
    model: Callable, num_draws: int, rng_key: PRNGKey, model_args: tuple, model_kwargs: dict
) -> dict[str, jax.Array]:
    """``num_draws`` draws of every sample and deterministic site from the prior, observed
    sites simulated: ``{site: array (num_draws, *site_shape)}``."""
    predictive = Predictive(_Unobserved(model), num_samples=num_draws, parallel=True)
    return predictive(rng_key, *model_args, **model_kwargs)
