r"""The auxiliary (non-centered) form of a NumPyro model, as an effect-handler strategy.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.reparam import LocScaleReparam, Reparam, TransformReparam

__all__ = ["auxiliary", "auxiliary_strategy", "check_auxiliary", "site_report"]

_DECENTERED = "_decentered"
_LOC_SCALE: dict[type, tuple[str, ...]] = {
    dist.Normal: (),
    dist.Cauchy: (),
    dist.Laplace: (),
    dist.Logistic: (),
    dist.Gumbel: (),
    dist.SoftLaplace: (),
    dist.StudentT: ("df",),
}
# family -> (name of the scale-like parameter, whether the value is scale * raw or raw / rate)
_SCALE: dict[type, tuple[str, bool]] = {
    dist.HalfNormal: ("scale", True),
    dist.HalfCauchy: ("scale", True),
    dist.Exponential: ("rate", False),
    dist.Gamma: ("rate", False),
}


def _unwrap(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


class MultivariateNormalReparam(Reparam):
    r"""Non-center a ``MultivariateNormal`` site: :math:`x = \mu + L z`, :math:`z \sim N(0, I)`."""

    def __call__(self, name: str, fn: dist.Distribution, obs: Any) -> tuple[None, jax.Array]:
        assert obs is None, "MultivariateNormalReparam does not support observed sites"
        base = _unwrap(fn)
        raw = numpyro.sample(
            name + _DECENTERED,
            dist.Normal(jnp.zeros(fn.shape()), 1.0).to_event(fn.event_dim),
        )
        value = base.loc + jnp.einsum("...ij,...j->...i", base.scale_tril, raw)
        return None, value


class ScaleReparam(Reparam):
    r"""Non-center a scale family: :math:`\tau = s\,\tau_{\rm raw}` or :math:`\tau_{\rm raw}/r`."""

    def __call__(self, name: str, fn: dist.Distribution, obs: Any) -> tuple[None, jax.Array]:
        assert obs is None, "ScaleReparam does not support observed sites"
        fn, expand_shape, event_dim = self._unwrap(fn)
        param, multiply = _SCALE[type(fn)]
        scale = getattr(fn, param)
        unit = (
            {"scale": jnp.ones_like(scale)} if param == "scale" else {"rate": jnp.ones_like(scale)}
        )
        if isinstance(fn, dist.Gamma):
            unit["concentration"] = fn.concentration
        raw = numpyro.sample(
            name + _DECENTERED, self._wrap(type(fn)(**unit), expand_shape, event_dim)
        )
        return None, raw * scale if multiply else raw / scale


def _choose(msg: dict) -> tuple[Reparam | None, str]:
    """The reparameterizer for a sample site and a one-line reason for the choice."""
    fn = _unwrap(msg["fn"])
    family = type(fn).__name__
    if msg["name"].endswith(_DECENTERED):
        return None, "created by auxiliary(): already unit-scale noise"
    if isinstance(fn, dist.MaskedDistribution):
        return None, f"{family} (masked) is left centered; apply the mask inside the model instead"
    if type(fn) in _LOC_SCALE:
        return (
            LocScaleReparam(centered=0, shape_params=_LOC_SCALE[type(fn)]),
            f"{family}: loc + scale * {msg['name']}{_DECENTERED}",
        )
    if isinstance(fn, dist.MultivariateNormal):
        return (
            MultivariateNormalReparam(),
            f"{family}: loc + scale_tril @ {msg['name']}{_DECENTERED}",
        )
    if type(fn) in _SCALE:
        return ScaleReparam(), f"{family}: unit-scale {msg['name']}{_DECENTERED} times its scale"
    if isinstance(fn, dist.TransformedDistribution):
        return TransformReparam(), f"{family}: transform of {msg['name']}_base"
    return None, (
        f"{family} has no non-centered form here; it is sampled on its unconstrained scale "
        "(rewrite it as a deterministic map of unit-scale noise to make it auxiliary)"
    )


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
