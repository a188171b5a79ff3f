"""SVI on a Pyro model with Pyro's own SVI (torch optimiser), InferenceData out.

This module holds :func:`pyro_svi_infer`, what ``emdppl.infer(pyro_model, emdppl.SVI(...))``
runs: a Pyro autoguide fitted by ``pyro.infer.SVI`` on the auxiliary model of
:func:`emdppl.bridge.pyro_target.target_from_pyro`, its draws pushed through that target's
``postprocess_fn`` host code, so that the InferenceData has the layout of :class:`emdppl.SVI`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from emdppl.base import PRNGKey
from emdppl.bridge.pyro_model import require_pyro
from emdppl.bridge.pyro_target import target_from_pyro, torch_seed
from emdppl.curvature import (
    MAX_CURVATURE_DIM,
    NUM_CURVATURE_DRAWS,
    laplace_marginal_sd,
    mean_hessian,
)
from emdppl.diagnostics import check_guide_scales, check_svi_loss, warn

__all__ = ["pyro_svi_infer"]

_PYRO_GUIDES = {
    "auto_normal": "AutoNormal",
    "auto_multivariate_normal": "AutoMultivariateNormal",
    "auto_lowrank_multivariate_normal": "AutoLowRankMultivariateNormal",
    "auto_delta": "AutoDelta",
}


def _fit(host: Any, config: Any, seed: int, progress_bar: bool) -> tuple[Any, np.ndarray]:
    """Fit the auto-guide ``config.guide`` to ``host.model``: ``(guide, loss per step)``."""
    from tqdm.auto import tqdm

    _, pyro = require_pyro()
    from pyro import infer as pyro_infer
    from pyro.infer import autoguide

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = getattr(autoguide, _PYRO_GUIDES[config.guide])(host.model)
    decay = 0.01 ** (1.0 / max(config.num_steps, 1))
    svi = pyro_infer.SVI(
        host.model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.01, "lrd": decay}),
        pyro_infer.Trace_ELBO(num_particles=config.num_particles),
    )
    losses = np.empty(config.num_steps)
    for step in tqdm(range(config.num_steps), desc="pyro svi", disable=not progress_bar):
        losses[step] = svi.step(*host.model_args, **host.model_kwargs)
        if not np.isfinite(losses[step]):
            raise FloatingPointError(
                f"Pyro SVI loss is {losses[step]} at step {step}; lower the learning rate or "
                "check the model's data. Parameters are in pyro.get_param_store()."
            )
    return guide, losses


def _guide_draws(host: Any, guide: Any, num_samples: int) -> dict:
    """``num_samples`` guide draws of every latent site on the unconstrained (auxiliary) scale:
    ``{site: float64 array (num_samples, *shape)}``."""
    torch, _ = require_pyro()
    from pyro import infer as pyro_infer

    draws = pyro_infer.Predictive(guide, num_samples=num_samples)(
        *host.model_args, **host.model_kwargs
    )
    with torch.no_grad():
        return {
            k: host.transforms[k](draws[k].to(torch.float64)).cpu().numpy()
            for k in host.layout.names
        }


def _guide_posterior(host: Any, unconstrained: dict, num_chains: int) -> dict:
    """The draws of :func:`_guide_draws` pushed through the model, split into ``num_chains``
    chains: ``{site: (num_chains, num_samples // num_chains, ...)}``."""
    num_samples = len(next(iter(unconstrained.values())))
    flat = np.concatenate(
        [unconstrained[k].reshape(num_samples, -1) for k in host.layout.names], axis=-1
    )
    return host(flat.astype(np.float32).reshape(num_chains, -1, flat.shape[-1]))


def _scale_ratios(target: Any, unconstrained: dict, guide: str) -> dict | None:
    r"""The guide-scale ratios of :class:`emdppl.SVI`'s check for a Pyro guide: the sd of its
    draws over :math:`\sqrt{(\bar H^{-1})_{ii}}`, :math:`\bar H` the negative Hessian of the
    target's log density averaged over the first
    :data:`~emdppl.curvature.NUM_CURVATURE_DRAWS` draws (by central differences of its
    gradient, :func:`emdppl.curvature.hessian`: torch gives JAX one derivative), per
    unconstrained latent coordinate: ``{site: array of the site's shape}``. The sds come from
    the ``num_samples`` draws rather than the guide's parameters (relative error about
    :math:`1/\sqrt{2 n}`, 2% at 1000 draws, against a 5x threshold). ``None`` for
    ``auto_delta`` and above :data:`emdppl.curvature.MAX_CURVATURE_DIM` coordinates."""
    draws = {k: v.reshape(len(v), -1) for k, v in unconstrained.items()}
    flat = np.concatenate([draws[k] for k in sorted(draws)], axis=-1)  # ravel_pytree's order
    _, unravel = ravel_pytree({k: v[0] for k, v in unconstrained.items()})
    if guide == "auto_delta" or flat.shape[1] > MAX_CURVATURE_DIM:
        return None
    logdensity = target.logdensity_fn

    def loss(x: jax.Array) -> jax.Array:
        return -logdensity(unravel(x))

    points = jnp.asarray(flat[:NUM_CURVATURE_DRAWS], jnp.float32)
    neg_hessian = mean_hessian(loss, points)
    return jax.device_get(unravel(flat.std(0) / laplace_marginal_sd(neg_hessian)))


def pyro_svi_infer(
    model: Callable,
    config: Any,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
    progress_bar: bool = True,
) -> Any:
    """Fit a Pyro autoguide with Pyro's own SVI and return InferenceData like :class:`emdppl.SVI`.

    ``config`` is an :class:`emdppl.SVI` whose ``guide`` is an auto-guide name; the optimiser is
    ``pyro.optim.ClippedAdam`` (learning rate 0.01 decayed by 100x over ``num_steps``) and the
    loss ``Trace_ELBO(num_particles)``. ``num_samples`` guide draws are pushed through the
    auxiliary model by the same host code as :func:`target_from_pyro`'s ``postprocess_fn``, so
    ``posterior`` has the MCMC layout (``config.num_chains`` chains of independent draws); the loss
    per step is the ``svi_trace`` group. A loss still falling at the end of the run warns
    (:func:`emdppl.diagnostics.check_svi_loss`; also in ``attrs["warnings"]``), and so does a
    guide sd collapsed below the Laplace sd (:func:`emdppl.diagnostics.check_guide_scales`, as
    for :class:`emdppl.SVI`; the ratios from the guide's draws, see :func:`_scale_ratios`).
    ``config.devices`` must be ``None`` (``ValueError``): Pyro's SVI runs in torch on the host.

    Examples
    --------
    >>> idata = emdppl.infer(pyro_model, emdppl.SVI("auto_normal"))  # doctest: +SKIP
    """
    from emdppl.inference_data import to_arviz

    _, pyro = require_pyro()
    if not isinstance(config.guide, str) or config.guide not in _PYRO_GUIDES:
        raise ValueError(
            f"a Pyro model takes a guide name from {sorted(_PYRO_GUIDES)}, got {config.guide!r}."
        )
    if getattr(config, "devices", None) is not None:
        raise ValueError(
            "emdppl.SVI(devices=...) splits a NumPyro model's ELBO particles over devices; a "
            "Pyro model runs Pyro's own SVI in this process's torch and cannot use them. Drop "
            "devices= (or write the model in NumPyro)."
        )
    target = target_from_pyro(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_chains=1,
        rng_key=rng_key,
        auxiliary=auxiliary,
    )
    host = target.postprocess_fn.host
    start = time.perf_counter()
    with pyro.validation_enabled(False):
        guide, losses = _fit(host, config, torch_seed(rng_key), progress_bar)
        fit_seconds = time.perf_counter() - start
        unconstrained = _guide_draws(host, guide, config.num_samples)
        posterior = _guide_posterior(host, unconstrained, config.num_chains)
        ratios = _scale_ratios(target, unconstrained, config.guide)
    problems = check_svi_loss(losses, "emdppl.SVI")
    if ratios is not None:
        problems += check_guide_scales(ratios, config.guide)
    warn(problems, f"emdppl.SVI({config.guide!r}) on a Pyro model")
    attrs = {
        "algorithm": "svi",
        "backend": "pyro",
        "guide": config.guide,
        "num_steps": config.num_steps,
        "num_particles": config.num_particles,
        "num_samples": config.num_samples,
        "auxiliary": int(auxiliary),
        "final_loss": float(np.mean(losses[-max(1, config.num_steps // 100) :])),
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - start,
        "warnings": problems,
    }
    return to_arviz(posterior, attrs=attrs, svi_trace={"loss": losses[None]})
