r"""The auxiliary (non-centered) form of a model, as an effect-handler strategy.

In auxiliary form every continuous latent is a fixed-scale noise variable pushed through a
deterministic map (Kingma & Welling 2014):

- loc-scale families (Normal, StudentT, Cauchy, Laplace, Logistic, Gumbel, SoftLaplace):
  :math:`\theta = \mu + \tau\,\theta_{\rm raw}`, ``LocScaleReparam(centered=0)``;
- ``MultivariateNormal``: :math:`x = \mu + L\,x_{\rm raw}` with :math:`L` its ``scale_tril``;
- scale families (HalfNormal, HalfCauchy, Exponential, Gamma):
  :math:`\tau = s\,\tau_{\rm raw}` with :math:`\tau_{\rm raw}` of unit scale;
- ``TransformedDistribution`` (``LogNormal``, ...): ``TransformReparam`` of its base, whose
  base site is itself non-centered when it is loc-scale.

Sites the strategy creates (``*_decentered``) are skipped, so it never recurses. Observed sites
are left untouched. :func:`check_auxiliary` reports, site by site, what the strategy did.

The module holds the NumPyro strategy (:func:`auxiliary`, :func:`auxiliary_strategy`,
:func:`check_auxiliary`) and what both PPLs share: the family table keyed by family name
(``LOC_SCALE_FAMILIES``, ``SCALE_FAMILIES``), the choice of a site's form
(:func:`choose_form`, :func:`choose_reparam`) and the per-site report (:func:`site_report`).
The Pyro strategy (:mod:`emdppl.bridge.pyro_model`) maps the same choices to Pyro's
reparameterizers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam, Reparam, TransformReparam

__all__ = [
    "DECENTERED",
    "LOC_SCALE_FAMILIES",
    "SCALE_FAMILIES",
    "Families",
    "auxiliary",
    "auxiliary_strategy",
    "check_auxiliary",
    "choose_form",
    "choose_reparam",
    "families_of",
    "site_report",
    "unit_scale",
    "unwrap",
]

DECENTERED = "_decentered"
# family -> names of the parameters LocScaleReparam keeps (shape parameters)
LOC_SCALE_FAMILIES: dict[str, tuple[str, ...]] = {
    "Normal": (),
    "Cauchy": (),
    "Laplace": (),
    "Logistic": (),
    "Gumbel": (),
    "SoftLaplace": (),
    "StudentT": ("df",),
}
# family -> (scale-like parameter, whether the value is scale * raw or raw / rate, the other
# parameters the unit-scale twin keeps)
SCALE_FAMILIES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "HalfNormal": ("scale", True, ()),
    "HalfCauchy": ("scale", True, ()),
    "Exponential": ("rate", False, ()),
    "Gamma": ("rate", False, ("concentration",)),
}


class Families(NamedTuple):
    """One PPL's distribution classes for the family table (built by :func:`families_of`)."""

    wrappers: tuple[type, ...]
    masked: type
    multivariate_normal: type
    transformed: type
    loc_scale: dict[type, tuple[str, ...]]
    scale: dict[type, tuple[str, bool, tuple[str, ...]]]


def families_of(distributions: Any, multivariate_normal: type, transformed: type) -> Families:
    """The classes of a distributions module (``numpyro.distributions``,
    ``pyro.distributions``) named by the family table; ``multivariate_normal`` and
    ``transformed`` are the base classes a site is tested against with ``isinstance``."""
    return Families(
        wrappers=(distributions.Independent, distributions.ExpandedDistribution),
        masked=distributions.MaskedDistribution,
        multivariate_normal=multivariate_normal,
        transformed=transformed,
        loc_scale={getattr(distributions, k): v for k, v in LOC_SCALE_FAMILIES.items()},
        scale={getattr(distributions, k): v for k, v in SCALE_FAMILIES.items()},
    )


def unwrap(fn: Any, families: Families) -> Any:
    """``fn`` without its ``Independent`` / ``ExpandedDistribution`` wrappers."""
    while isinstance(fn, families.wrappers):
        fn = fn.base_dist
    return fn


def unit_scale(fn: Any, families: Families, ones_like: Callable) -> tuple[Any, Any, bool]:
    """``(unit, scale, multiply)`` for a scale-family ``fn``: its unit-scale twin, its scale
    parameter, and whether the value is ``raw * scale`` (else ``raw / rate``)."""
    param, multiply, kept = families.scale[type(fn)]
    scale = getattr(fn, param)
    unit = {param: ones_like(scale), **{k: getattr(fn, k) for k in kept}}
    return type(fn)(**unit), scale, multiply


def choose_form(name: str, fn: Any, families: Families) -> tuple[str | None, str]:
    """The auxiliary form of the sample site ``name`` with (unwrapped) distribution ``fn``.

    Returns ``(form, reason)``: ``form`` is ``"loc_scale"``, ``"multivariate_normal"``,
    ``"scale"``, ``"transform"`` or ``None`` (left as it is), ``reason`` one line saying why.
    """
    family = type(fn).__name__
    if name.endswith(DECENTERED):
        return None, "created by auxiliary(): already unit-scale noise"
    if isinstance(fn, families.masked):
        return None, f"{family} (masked) is left centered; apply the mask inside the model instead"
    if type(fn) in families.loc_scale:
        return "loc_scale", f"{family}: loc + scale * {name}{DECENTERED}"
    if isinstance(fn, families.multivariate_normal):
        return "multivariate_normal", f"{family}: loc + scale_tril @ {name}{DECENTERED}"
    if type(fn) in families.scale:
        return "scale", f"{family}: unit-scale {name}{DECENTERED} times its scale"
    if isinstance(fn, families.transformed):
        return "transform", f"{family}: transform of {name}_base"
    return None, (
        f"{family} has no non-centered form here; it is sampled on its unconstrained scale "
        "(rewrite it as a deterministic map of unit-scale noise to make it auxiliary)"
    )


def choose_reparam(
    msg: dict, families: Families, reparams: Mapping[str, Callable[[Any], Any]]
) -> tuple[Any, str]:
    """The reparameterizer for a sample site and a one-line reason (:func:`choose_form`);
    ``reparams`` maps each form to a constructor taking the unwrapped distribution."""
    fn = unwrap(msg["fn"], families)
    form, reason = choose_form(msg["name"], fn, families)
    return (None if form is None else reparams[form](fn)), reason


_FAMILIES = families_of(dist, dist.MultivariateNormal, dist.TransformedDistribution)


def _unwrap(fn: dist.Distribution) -> dist.Distribution:
    return unwrap(fn, _FAMILIES)


class MultivariateNormalReparam(Reparam):
    r"""Non-center a ``MultivariateNormal`` site: :math:`x = \mu + L z`, :math:`z \sim N(0, I)`."""

    def __call__(self, name: str, fn: dist.Distribution, obs: Any) -> tuple[None, jax.Array]:
        assert obs is None, "MultivariateNormalReparam does not support observed sites"
        base = _unwrap(fn)
        raw = numpyro.sample(
            name + DECENTERED,
            dist.Normal(jnp.zeros(fn.shape()), 1.0).to_event(fn.event_dim),
        )
        value = base.loc + jnp.einsum("...ij,...j->...i", base.scale_tril, raw)
        return None, value


class ScaleReparam(Reparam):
    r"""Non-center a scale family: :math:`\tau = s\,\tau_{\rm raw}` or :math:`\tau_{\rm raw}/r`."""

    def __call__(self, name: str, fn: dist.Distribution, obs: Any) -> tuple[None, jax.Array]:
        assert obs is None, "ScaleReparam does not support observed sites"
        fn, expand_shape, event_dim = self._unwrap(fn)
        unit, scale, multiply = unit_scale(fn, _FAMILIES, jnp.ones_like)
        raw = numpyro.sample(name + DECENTERED, self._wrap(unit, expand_shape, event_dim))
        return None, raw * scale if multiply else raw / scale


_REPARAMS: dict[str, Callable[[Any], Reparam]] = {
    "loc_scale": lambda fn: LocScaleReparam(centered=0, shape_params=_FAMILIES.loc_scale[type(fn)]),
    "multivariate_normal": lambda fn: MultivariateNormalReparam(),
    "scale": lambda fn: ScaleReparam(),
    "transform": lambda fn: TransformReparam(),
}


def _choose(msg: dict) -> tuple[Reparam | None, str]:
    """The NumPyro reparameterizer for a sample site and a one-line reason for the choice."""
    return choose_reparam(msg, _FAMILIES, _REPARAMS)


def auxiliary_strategy(msg: dict) -> Reparam | None:
    """Reparam strategy for ``numpyro.handlers.reparam(config=...)``: see the module docstring."""
    if msg["type"] != "sample" or msg.get("is_observed") or msg["fn"].is_discrete:
        return None
    return _choose(msg)[0]


def auxiliary(model: Callable) -> Callable:
    """Return ``model`` in auxiliary (non-centered) form.

    Parameters
    ----------
    model
        A NumPyro model.

    Returns
    -------
    Callable
        ``handlers.reparam(model, config=auxiliary_strategy)``: same signature, same joint law
        of the original sites (now deterministic sites), latents of unit scale.

    Examples
    --------
    >>> import numpyro, numpyro.distributions as dist, emdppl
    >>> def model():
    ...     mu = numpyro.sample("mu", dist.Normal(0, 5))
    ...     numpyro.sample("theta", dist.Normal(mu, 2))
    >>> aux = emdppl.auxiliary(model)   # latents: mu_decentered, theta_decentered
    """
    return handlers.reparam(model, config=auxiliary_strategy)


def check_auxiliary(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    strict: bool = False,
    rng_key: int | jax.Array = 0,
) -> dict[str, dict[str, str]]:
    """Report what :func:`auxiliary` does to each latent site of ``model``.

    Parameters
    ----------
    model, model_args, model_kwargs
        The NumPyro model and the arguments it is called with.
    strict
        Raise a ``ValueError`` naming every site that is not auxiliary (left centered or
        discrete) and how to fix it.
    rng_key
        Seed for the one forward run of the model.

    Returns
    -------
    dict
        ``{site: {"status": "auxiliary" | "centered" | "discrete", "distribution": name,
        "detail": reason}}`` for every latent sample site of the original model.
    """
    from emdppl.base import as_key

    model_kwargs = model_kwargs or {}
    trace = handlers.trace(handlers.seed(model, as_key(rng_key))).get_trace(
        *model_args, **model_kwargs
    )
    latents = {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    return site_report(latents, _unwrap, lambda fn: fn.is_discrete, _choose, strict=strict)


def site_report(
    latents: dict[str, dict],
    unwrap: Callable[[Any], Any],
    is_discrete: Callable[[Any], bool],
    choose: Callable[[dict], tuple[Any, str]],
    *,
    strict: bool,
) -> dict[str, dict[str, str]]:
    """The per-site report of :func:`check_auxiliary`, for NumPyro and Pyro traces alike.

    ``latents`` maps site names to trace sites; ``unwrap``, ``is_discrete`` and ``choose`` are
    the backend's own helpers (distribution unwrapping, discreteness, reparam choice).
    """
    report: dict[str, dict[str, str]] = {}
    for name, site in latents.items():
        family = type(unwrap(site["fn"])).__name__
        if is_discrete(site["fn"]):
            status, detail = "discrete", (
                "discrete latent: gradient-based samplers cannot move it; marginalise it out in "
                "the model (e.g. a mixture log-sum-exp) or make it observed"
            )
        else:
            reparam, detail = choose(site)
            status = "auxiliary" if reparam is not None else "centered"
        report[name] = {"status": status, "distribution": family, "detail": detail}
    bad = {k: v for k, v in report.items() if v["status"] != "auxiliary"}
    if strict and bad:
        lines = "\n".join(
            f"  - {k} ({v['distribution']}, {v['status']}): {v['detail']}" for k, v in bad.items()
        )
        raise ValueError(f"{len(bad)} latent site(s) are not in auxiliary form:\n{lines}")
    return report
