"""The one adapter from emdppl's arrays to ArviZ.

Groups are built as ``xarray.Dataset``\\s with ``(chain, draw, ...)`` dimensions and assembled as
``arviz.InferenceData`` (arviz < 1) or ``xarray.DataTree`` (arviz >= 1, whose InferenceData
is a DataTree), so the same code serves both ArviZ generations. ``sample_stats`` use the names
ArviZ's own converters use (``lp``, ``acceptance_rate``, ``diverging``, ``energy``,
``n_steps``, ``step_size``, ``tree_depth``) plus emdppl's ``n_grad_evals``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["to_arviz", "versions"]


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


def _dataset(arrays: dict[str, Any], attrs: dict[str, Any]) -> xr.Dataset:
    variables, coords = {}, {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.ndim < 2:
            raise ValueError(
                f"to_arviz: {name!r} has shape {value.shape}; every array needs leading "
                "(chain, draw) axes."
            )
        dims = ["chain", "draw"] + [f"{name}_dim_{i}" for i in range(value.ndim - 2)]
        variables[name] = (dims, value)
        coords.setdefault("chain", np.arange(value.shape[0]))
        coords.setdefault("draw", np.arange(value.shape[1]))
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def _netcdf_safe(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as str/int/float (dicts and arrays as JSON) so ``to_netcdf`` accepts them."""
    safe = {}
    for key, value in attrs.items():
        if isinstance(value, (str, int, float, np.integer, np.floating)):
            safe[key] = value
        else:
            safe[key] = json.dumps(value, default=lambda x: np.asarray(x).tolist())
    return safe


def to_arviz(
    posterior: dict[str, Any],
    sample_stats: dict[str, Any] | None = None,
    attrs: dict[str, Any] | None = None,
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
        Run attributes (sampler, tuned parameters, timings); stored on every group, with
        library versions added. Non-scalar values are JSON-encoded.
    **groups
        Further groups of the same form (e.g. ``warmup_sample_stats``, ``estep_posterior``).

    Returns
    -------
    arviz.InferenceData
        (an ``xarray.DataTree`` under arviz >= 1).
    """
    attrs = _netcdf_safe({"inference_library": "emdppl", **versions(), **(attrs or {})})
    datasets = {"posterior": _dataset(posterior, attrs)}
    if sample_stats:
        datasets["sample_stats"] = _dataset(sample_stats, attrs)
    for name, arrays in groups.items():
        if arrays:
            datasets[name] = _dataset(arrays, attrs)
    import arviz as az  # here, not at module level: importing arviz takes about 2 s

    if int(az.__version__.split(".")[0]) >= 1:
        return xr.DataTree.from_dict(datasets)
    return az.InferenceData(**datasets)
