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

import numpy as np

from emdppl.base import PRNGKey
from emdppl.bridge.pyro_model import require_pyro
from emdppl.bridge.pyro_target import target_from_pyro, torch_seed
from emdppl.diagnostics import check_svi_loss, warn

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


def _guide_posterior(host: Any, guide: Any, num_samples: int, num_chains: int) -> dict:
    """``num_samples`` guide draws pushed through the model, split into ``num_chains`` chains:
    ``{site: (num_chains, num_samples // num_chains, ...)}``."""
    torch, _ = require_pyro()
    from pyro import infer as pyro_infer

    draws = pyro_infer.Predictive(guide, num_samples=num_samples)(
        *host.model_args, **host.model_kwargs
    )
    with torch.no_grad():
        unconstrained = {
            k: host.transforms[k](draws[k].to(torch.float64)) for k in host.layout.names
        }
    flat = torch.cat([unconstrained[k].reshape(num_samples, -1) for k in host.layout.names], dim=-1)
    return host(flat.cpu().numpy().astype(np.float32).reshape(num_chains, -1, flat.shape[-1]))


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
    (:func:`emdppl.diagnostics.check_svi_loss`; also in ``attrs["warnings"]``); the guide-scale
    check of :class:`emdppl.SVI` is not run on Pyro's torch guides.

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
        posterior = _guide_posterior(host, guide, config.num_samples, config.num_chains)
    problems = check_svi_loss(losses, "emdppl.SVI")
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
