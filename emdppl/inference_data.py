"""The one adapter from emdppl's arrays to ArviZ.

Groups are built as ``xarray.Dataset``\\s and assembled as one ``xarray.DataTree``: returned as
it is under arviz >= 1 (whose InferenceData is a DataTree), converted by ``az.from_datatree``
under arviz < 1, so the same code serves both ArviZ generations. ``sample_stats`` use the names
ArviZ's own converters use (``lp``, ``acceptance_rate``, ``diverging``, ``energy``,
``n_steps``, ``step_size``, ``tree_depth``) plus emdppl's ``n_grad_evals``.

:func:`to_arviz` turns named arrays into groups; :func:`add_model_groups` is the one place where
an algorithm's result becomes the full ArviZ data of a model (what ``az.from_numpyro`` gives):
the posterior split into the model's own sites and the auxiliary ones
(``unconstrained_posterior``), ``log_likelihood``, ``observed_data``, ``constant_data``, on
request ``posterior_predictive``, ``prior`` and ``prior_predictive``, and dims named after
plates.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from emdppl.base import PRNGKey, as_key

if TYPE_CHECKING:
    import xarray as xr

    from emdppl.problem import Problem

__all__ = ["add_model_groups", "to_arviz", "versions"]

#: Groups without the leading ``(chain, draw)`` axes.
DATA_GROUPS = ("observed_data", "constant_data", "predictions_constant_data")
#: The order of the groups in the result (others follow in the order they come).
GROUP_ORDER = (
    "posterior",
    "unconstrained_posterior",
    "posterior_predictive",
    "log_likelihood",
    "sample_stats",
    "prior",
    "prior_predictive",
    "observed_data",
    "constant_data",
)


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in ("emdppl", "jax", "jaxlib", "numpyro", "blackjax", "optax", "equinox", "arviz"):
        try:
            out.append((f"{name}_version", importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((f"{name}_version", "not installed"))
    return tuple(out)


def versions() -> dict[str, str]:
    """Versions of emdppl and the libraries that shaped a result."""
    return dict(_versions())


def _var_dims(name: str, shape: tuple[int, ...], given: Sequence[str | None] | None) -> list:
    """Names of a variable's axes: ``given`` where it names them, else ``<name>_dim_<i>``."""
    given = list(given or ())
    if len(given) > len(shape):
        raise ValueError(
            f"dims[{name!r}] = {given} names {len(given)} axes, but {name!r} has "
            f"{len(shape)} besides (chain, draw): shape {shape}."
        )
    given += [None] * (len(shape) - len(given))
    return [d if d is not None else f"{name}_dim_{i}" for i, d in enumerate(given)]


def _dataset(
    arrays: Mapping[str, Any],
    attrs: dict[str, Any],
    *,
    sample_ndim: int = 2,
    dims: Mapping[str, Sequence[str | None]] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """One group: ``arrays`` ``{name: array (chain, draw, ...)}`` (``sample_ndim=2``) or
    ``{name: array (...)}`` (0), their axes named by ``dims`` (integer coords unless
    ``coords`` gives them)."""
    dims, coords = dims or {}, coords or {}
    variables, used = {}, {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.ndim < sample_ndim:
            raise ValueError(
                f"to_arviz: {name!r} has shape {value.shape}; every array needs leading "
                "(chain, draw) axes."
            )
        names = ["chain", "draw"][:sample_ndim]
        names += _var_dims(name, value.shape[sample_ndim:], dims.get(name))
        variables[name] = (names, value)
        used.update(zip(names, value.shape, strict=True))
    labels = {}
    for dim, size in used.items():
        if dim in coords:
            labels[dim] = np.asarray(coords[dim])
            if labels[dim].shape != (size,):
                raise ValueError(
                    f"coords[{dim!r}] has {labels[dim].size} values, but dim {dim!r} has size "
                    f"{size}."
                )
        else:
            labels[dim] = np.arange(size)
    import xarray as xr  # here, with arviz: importing xarray (and pandas) takes about 0.7 s

    return xr.Dataset(variables, coords=labels, attrs=attrs)


def _netcdf_safe(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as str/int/float (dicts and arrays as JSON) so ``to_netcdf`` accepts them."""
    safe = {}
    for key, value in attrs.items():
        if isinstance(value, (str, int, float, np.integer, np.floating)):
            safe[key] = value
        else:
            safe[key] = json.dumps(value, default=lambda x: np.asarray(x).tolist())
    return safe


def _attrs(attrs: dict[str, Any] | None) -> dict[str, Any]:
    library = versions()
    return _netcdf_safe(
        {
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "inference_library": "emdppl",
            "inference_library_version": library["emdppl_version"],
            **library,
            **(attrs or {}),
        }
    )


def _assemble(datasets: dict[str, xr.Dataset]) -> Any:
    """The one constructor: a DataTree (arviz >= 1), an InferenceData from it (arviz < 1)."""
    import arviz as az  # here, not at module level: importing arviz takes about 2 s
    import xarray as xr

    rank = {group: i for i, group in enumerate(GROUP_ORDER)}
    order = sorted(datasets, key=lambda group: rank.get(group, len(rank)))  # stable
    tree = xr.DataTree.from_dict({group: datasets[group] for group in order})
    if int(az.__version__.split(".")[0]) >= 1:
        return tree
    return az.from_datatree(tree)


def _datasets(idata: Any) -> dict[str, xr.Dataset]:
    """The groups of ArviZ data of either generation, ``{group: Dataset}``."""
    import xarray as xr

    tree = idata if isinstance(idata, xr.DataTree) else idata.to_datatree()
    return {name: node.to_dataset() for name, node in tree.children.items()}


def to_arviz(
    posterior: dict[str, Any],
    sample_stats: dict[str, Any] | None = None,
    attrs: dict[str, Any] | None = None,
    *,
    dims: Mapping[str, Sequence[str | None]] | None = None,
    coords: Mapping[str, Any] | None = None,
    **groups: dict[str, Any],
) -> Any:
    """Assemble ArviZ data from named arrays with leading ``(chain, draw)`` axes.

    Parameters
    ----------
    posterior
        ``{name: array (chain, draw, ...)}``.
    sample_stats
        Per-draw statistics, ``{name: array (chain, draw, ...)}``.
    attrs
        Run attributes (algorithm, tuned parameters, timings); stored on every group, with
        ``created_at``, ``inference_library="emdppl"``, ``inference_library_version`` and
        library versions added. Non-scalar values are JSON-encoded.
    dims
        ``{name: [dim, ...]}``, names of the axes after ``(chain, draw)`` (``None`` or missing
        axes: ``<name>_dim_<i>``), for every group, as ``az.from_dict(dims=)``.
    coords
        ``{dim: values}``; integer coords for the other dims.
    **groups
        Further groups of the same form (e.g. ``log_likelihood``, ``svi_trace``,
        ``estep_posterior``); ``observed_data`` and ``constant_data`` have no
        ``(chain, draw)`` axes.

    Returns
    -------
    arviz.InferenceData
        (an ``xarray.DataTree`` under arviz >= 1).
    """
    attrs = _attrs(attrs)
    arrays = {"posterior": posterior, "sample_stats": sample_stats, **groups}
    return _assemble(
        {
            group: _dataset(
                values,
                attrs,
                sample_ndim=0 if group in DATA_GROUPS else 2,
                dims=dims,
                coords=coords,
            )
            for group, values in arrays.items()
            if values or group == "posterior"
        }
    )


def add_model_groups(
    idata: Any,
    problem: Problem,
    *,
    rng_key: int | PRNGKey = 0,
    posterior_predictive: bool = False,
    prior: bool = False,
    num_prior_draws: int = 500,
    dims: Mapping[str, Sequence[str | None]] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> Any:
    r"""An algorithm's ArviZ data completed with what the model gives (``az.from_numpyro``'s
    groups).

    ``posterior`` keeps the sites of the model as written (latent sites on their constrained
    scale and deterministic sites, in the model's order); every other variable of the
    algorithm's posterior (the auxiliary form's ``*_decentered`` sites, on their own support)
    moves to ``unconstrained_posterior``. Added: ``log_likelihood`` (pointwise
    :math:`\log p(y_i \mid \theta)` per observed site, ``(chain, draw, *batch_shape)``),
    ``observed_data``, ``constant_data`` (array arguments that are not observations), and on
    request ``posterior_predictive`` (observed sites simulated at each draw), ``prior`` and
    ``prior_predictive`` (``(chain=1, draw=num_prior_draws, ...)``). The algorithm's other
    groups (``sample_stats``, ``svi_trace``, ...) are kept. Axes are named after the plates
    (``theta: (chain, draw, J)``), ``dims`` overriding them variable by variable; ``coords``
    labels them. A :class:`~emdppl.Target` problem has no model: only the dims are applied.

    Parameters
    ----------
    idata
        What ``algorithm.infer(problem, ...)`` returned.
    problem
        The :class:`~emdppl.problem.Problem` it ran on.
    rng_key
        Seed or key for the simulated groups.
    posterior_predictive, prior, num_prior_draws
        Add ``posterior_predictive``; add ``prior`` and ``prior_predictive`` with
        ``num_prior_draws`` draws.
    dims, coords
        As ``az.from_numpyro(dims=, coords=)``: ``{var: [dim, ...]}`` and ``{dim: values}``.

    Returns
    -------
    arviz.InferenceData
        (an ``xarray.DataTree`` under arviz >= 1).
    """
    datasets = _datasets(idata)
    draws_ds = datasets.pop("posterior")
    attrs = _netcdf_safe({**draws_ds.attrs, "backend": problem.backend})
    draws = {k: draws_ds[k].values for k in draws_ds.data_vars}
    groups: dict[str, dict[str, Any]] = {}
    model_dims: dict[str, tuple] = {}
    if problem.backend == "target":
        groups["posterior"] = draws
    else:
        data = problem.model_data()
        model_dims = dict(data.dims)
        sites = [*data.latent, *data.deterministic]
        groups["posterior"] = {k: draws[k] for k in sites if k in draws}
        groups["unconstrained_posterior"] = {
            k: v for k, v in draws.items() if k not in groups["posterior"]
        }
        latents = {k: draws[k] for k in data.latent if k in draws}
        missing = [k for k in data.latent if k not in draws]
        pp_key, prior_key = jax.random.split(as_key(rng_key))
        if missing and (data.observed or posterior_predictive):
            warnings.warn(
                f"latent site(s) {missing} are not in the posterior: no log_likelihood or "
                "posterior_predictive group.",
                UserWarning,
                stacklevel=3,
            )
        elif data.observed:
            groups["log_likelihood"] = problem.log_likelihood(latents)
            if posterior_predictive:
                groups["posterior_predictive"] = problem.posterior_predictive(
                    latents, tuple(data.observed), pp_key
                )
        if prior:
            draws_prior = problem.prior(num_prior_draws, prior_key)
            groups["prior"] = {k: draws_prior[k][None] for k in sites if k in draws_prior}
            groups["prior_predictive"] = {k: draws_prior[k][None] for k in data.observed}
        groups["observed_data"] = data.observed
        groups["constant_data"] = problem.constant_data(data.observed)
    user_dims = dict(dims or {})
    built = {}
    for group, arrays in groups.items():
        if not arrays:
            continue
        sample_ndim = 0 if group in DATA_GROUPS else 2
        # a site's axis names (the log likelihood has the batch axes of its site only); an
        # argument (constant_data) is no site, even when a site has its name
        inferred = {
            k: model_dims.get(k, ())[: np.ndim(v) - sample_ndim]
            for k, v in arrays.items()
            if group != "constant_data"
        }
        built[group] = _dataset(
            arrays,
            attrs,
            sample_ndim=sample_ndim,
            dims={**inferred, **user_dims},
            coords=coords,
        )
    return _assemble({**built, **{k: v for k, v in datasets.items() if k not in built}})
