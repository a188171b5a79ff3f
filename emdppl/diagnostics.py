r"""What Stan checks after every run, on NumPy arrays with leading ``(chain, draw)`` axes.

:func:`check_mcmc` returns one message per problem found, each naming the sites and the fix:

- split :math:`\hat R` (rank-normalised, the larger of bulk and tail; Vehtari et al. 2021)
  above 1.01;
- bulk or tail effective sample size below 100 per chain;
- divergent transitions (advice that fits the form the run used);
- E-BFMI below 0.3 (a chain whose energy does not move: heavy tails, funnels);
- NUTS trees at the maximum depth;
- an adapted step size that collapsed (below ``1e-3``);
- non-finite draws.

:func:`check_svi_loss` and :func:`check_guide_scales` do the same for a variational fit: a loss
still falling at the end of the run, and a guide whose sd is far below the posterior's.

:func:`warn` turns the list into one ``RuntimeWarning`` at the caller's line. ESS and
:math:`\hat R` use :mod:`numpyro.diagnostics` (no ArviZ import).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from scipy.special import ndtri

from emdppl.base import caller_stacklevel

__all__ = [
    "check_constrained",
    "check_guide_scales",
    "check_mcmc",
    "check_svi_loss",
    "loss_drop",
    "rhat_ess",
    "warn",
]

MAX_RHAT = 1.01
MIN_ESS_PER_CHAIN = 100
MIN_EBFMI = 0.3
MIN_STEP_SIZE = 1e-3
#: SVI loss: the drop between the last two fifths of the run that counts as still decreasing,
#: in standard errors of the window means and in nats (both must be exceeded: the nats bound
#: keeps long converged runs, whose standard errors are tiny, silent).
MAX_LOSS_DROP_Z = 2.0
MIN_LOSS_DROP = 0.5
#: Guide sd over the sd implied by the posterior's curvature averaged over the guide, below
#: which a guide scale has collapsed (a mean field at :math:`R^2 > 0.96`).
MIN_SCALE_RATIO = 0.2


def _scalars(draws: dict) -> tuple[list[str], np.ndarray]:
    """Names ``site[i,j]`` and the stacked draws ``(chain, draw, n)`` of every scalar of a dict
    of sites (or any pytree of positions)."""
    if not isinstance(draws, dict):  # a bare array or another pytree of positions
        leaves = jax.tree.leaves(draws)
        draws = {"x": leaves[0]} if len(leaves) == 1 else {f"x{i}": v for i, v in enumerate(leaves)}
    names, columns = [], []
    for site, value in draws.items():
        value = np.asarray(value, float)
        flat = value.reshape(*value.shape[:2], -1)
        shape = value.shape[2:]
        for i in range(flat.shape[-1]):
            index = np.unravel_index(i, shape) if shape else ()
            names.append(f"{site}[{','.join(map(str, index))}]" if shape else site)
            columns.append(flat[..., i])
    return names, np.stack(columns, axis=-1)


def _rank_normal(x: np.ndarray) -> np.ndarray:
    """Rank-normalised draws (pooled over chains), per column of ``x (chain, draw, n)``."""
    c, d, n = x.shape
    ranks = np.argsort(np.argsort(x.reshape(c * d, n), axis=0), axis=0) + 1.0
    return ndtri((ranks - 0.375) / (c * d + 0.25)).reshape(c, d, n)


def rhat_ess(x: np.ndarray) -> dict[str, np.ndarray]:
    """Rank-normalised split R-hat (max of bulk and tail) and bulk/tail ESS per column of
    ``x (chain, draw, n)``; each value has shape ``(n,)``."""
    z = _rank_normal(x)
    folded = _rank_normal(np.abs(x - np.median(x, axis=(0, 1))))
    rhat = np.maximum(split_gelman_rubin(z), split_gelman_rubin(folded))
    lower, upper = np.quantile(x, [0.05, 0.95], axis=(0, 1))
    tail = np.minimum(
        effective_sample_size((x <= lower).astype(float)),
        effective_sample_size((x <= upper).astype(float)),
    )
    return {"rhat": rhat, "ess_bulk": effective_sample_size(z), "ess_tail": tail}


def _worst(names: list[str], values: np.ndarray, bad: np.ndarray, largest: bool) -> str:
    order = np.argsort(-values if largest else values)
    shown = [f"{names[i]} {values[i]:.3g}" for i in order if bad[i]][:5]
    more = int(bad.sum()) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _chain_checks(draws: dict, sampler: str) -> list[str]:
    names, x = _scalars(draws)
    messages = []
    finite = np.isfinite(x).all(axis=(1, 2))
    if not finite.all():
        chains = np.flatnonzero(~finite)
        first = {int(c): int(np.argmax(~np.isfinite(x[c]).all(-1))) for c in chains}
        messages.append(
            f"{chains.size} of {x.shape[0]} {sampler} chains produced non-finite draws "
            f"(chain: first bad draw {first}): the kernel is unstable at this step size. Lower it "
            f"(emdppl.MCMC({sampler!r}, step_size=...)), use a sampler with warm-up and a "
            "Metropolis step (nuts, mala), or check the model's log density for NaN/inf."
        )
        x = x[finite]
    if x.shape[0] < 2 or x.shape[1] < 4:
        return messages
    summary = rhat_ess(x)
    num_chains = x.shape[0]
    bad = ~(summary["rhat"] <= MAX_RHAT)
    if bad.any():
        messages.append(
            f"R-hat above {MAX_RHAT} for {int(bad.sum())} of {bad.size} scalars "
            f"({_worst(names, summary['rhat'], bad, True)}): the chains disagree, so they have "
            f"not converged. Run longer warm-up (num_warmup){_or_nuts(sampler)}."
        )
    for kind in ("ess_bulk", "ess_tail"):
        ess = summary[kind]
        bad = ~(ess >= MIN_ESS_PER_CHAIN * num_chains)
        if bad.any():
            messages.append(
                f"{kind.replace('_', ' ')} below {MIN_ESS_PER_CHAIN} per chain for "
                f"{int(bad.sum())} of {bad.size} scalars ({_worst(names, ess, bad, False)}): "
                "means and quantiles are unreliable. Draw more (num_samples)"
                f"{_or_nuts(sampler)}."
            )
    return messages


def _or_nuts(sampler: str) -> str:
    """The advice to switch to NUTS, except for a NUTS run."""
    return "" if sampler == "nuts" else " or use nuts"


def _chains_below(values: np.ndarray, threshold: float, message) -> list[str]:
    """``[message(chains, their values)]`` for the chains whose value is below ``threshold``
    (or NaN), else ``[]``."""
    low = np.flatnonzero(~(values >= threshold))
    if not low.size:
        return []
    return [message(low.tolist(), np.round(values[low], 8).tolist())]


def _raise_target_accept(sampler: str, target_accept: float | None) -> str:
    """The advice to raise the target acceptance above ``target_accept`` (``None``: the
    sampler's default, below 0.95), to 0.95 and then 0.99; ``""`` from 0.99 on."""
    if target_accept is not None and target_accept >= 0.99:
        return ""
    higher = 0.95 if target_accept is None or target_accept < 0.95 else 0.99
    return f"raise the target acceptance (emdppl.MCMC({sampler!r}, target_accept={higher})) or "


def _stats_checks(
    stats: dict, sampler: str, is_auxiliary: bool, max_tree_depth, target_accept
) -> list[str]:
    messages = []
    if "diverging" in stats and int(np.sum(stats["diverging"])):
        count, total = int(np.sum(stats["diverging"])), np.size(stats["diverging"])
        fix = (
            "sample the auxiliary form (emdppl.infer(..., auxiliary=True), the default) or "
            if not is_auxiliary
            else ""
        ) + _raise_target_accept(sampler, target_accept)
        fix += (
            "reparametrise the sites where the divergences concentrate (az.plot_pair("
            "idata, divergences=True))"
        )
        messages.append(
            f"{count} of {total} transitions diverged: the draws may be biased. Fix: {fix}."
        )
    if "energy" in stats:
        energy = np.asarray(stats["energy"], float)
        ebfmi = np.sum(np.diff(energy, axis=1) ** 2, axis=1) / np.sum(
            (energy - energy.mean(axis=1, keepdims=True)) ** 2, axis=1
        )
        messages += _chains_below(
            ebfmi,
            MIN_EBFMI,
            lambda chains, values: f"E-BFMI below {MIN_EBFMI} in chains {chains} ({values}): "
            "the momentum resampling hardly moves the energy (heavy tails or a funnel). "
            "Reparametrise (auxiliary=True) or use a dense mass matrix (dense_mass=True).",
        )
    if "tree_depth" in stats and max_tree_depth is not None:
        saturated = np.asarray(stats["tree_depth"]) >= max_tree_depth
        if saturated.mean() > 0.01:
            messages.append(
                f"{saturated.mean():.0%} of NUTS trees hit the maximum depth {max_tree_depth}: "
                "trajectories are cut short and sampling is slow. Raise max_num_doublings or "
                "reparametrise (the posterior is badly scaled)."
            )
    if "step_size" in stats:
        messages += _chains_below(
            np.asarray(stats["step_size"])[:, 0],
            MIN_STEP_SIZE,
            lambda chains, values: f"the adapted step size collapsed to {values} in chains "
            f"{chains}: warm-up did not find the typical set, so these chains hardly move. "
            f"Raise num_warmup, start elsewhere (emdppl.MCMC(init='optimize')){_or_nuts(sampler)}.",
        )
    return messages


def check_mcmc(
    draws: dict,
    stats: dict,
    sampler: str,
    *,
    is_auxiliary: bool = True,
    max_tree_depth: int | None = None,
    target_accept: float | None = None,
) -> list[str]:
    """The problems of an MCMC run, one message each (empty when it passes every check).

    Parameters
    ----------
    draws
        ``{site: array (chain, draw, ...)}``: unconstrained or constrained draws.
    stats
        Per-draw statistics ``(chain, draw)``: ``diverging``, ``energy``, ``tree_depth``,
        ``step_size`` where the kernel has them.
    sampler
        The sampler's name (for the advice).
    is_auxiliary
        Whether the run sampled the auxiliary form (decides the divergence advice).
    max_tree_depth
        NUTS's ``max_num_doublings``.
    target_accept
        The run's target acceptance (``None``: the sampler's default); the divergence advice
        names a higher one.
    """
    return _chain_checks(draws, sampler) + _stats_checks(
        stats, sampler, is_auxiliary, max_tree_depth, target_accept
    )


def check_constrained(posterior: dict) -> list[str]:
    """A message naming the sites whose draws are NaN/inf on the constrained scale (e.g. a
    singular covariance: the unconstrained draws are finite, the model's sites are not)."""
    bad = {
        site: float(np.mean(~np.isfinite(np.asarray(value, float))))
        for site, value in posterior.items()
        if not np.isfinite(np.asarray(value, float)).all()
    }
    if not bad:
        return []
    shares = ", ".join(f"{site} {share:.0%}" for site, share in sorted(bad.items()))
    return [
        f"site(s) {sorted(bad)} are NaN/inf on the constrained scale (share of draws: {shares}): "
        "a transform or deterministic of the model is undefined there (e.g. a singular "
        "covariance, log of a non-positive value). Check those sites' parameters."
    ]


def loss_drop(losses: np.ndarray) -> tuple[float, float]:
    r"""``(drop, z)``: how much the loss fell between the windows ``[0.6 n, 0.8 n)`` and
    ``[0.8 n, n)`` of ``losses (n,)``, :math:`\bar L_1 - \bar L_2`, and that drop in standard
    errors, :math:`z = (\bar L_1 - \bar L_2) / (\hat s \sqrt{1/n_1 + 1/n_2})`, with the
    per-step noise :math:`\hat s^2 = \overline{(\Delta L)^2} / 2` from successive differences
    (blind to a slow trend, so a trend does not inflate the noise that judges it)."""
    losses = np.asarray(losses, float)
    n = losses.shape[0]
    first, second = losses[int(0.6 * n) : int(0.8 * n)], losses[int(0.8 * n) :]
    drop = float(first.mean() - second.mean())
    noise = np.sqrt(np.mean(np.diff(losses[int(0.6 * n) :]) ** 2) / 2)
    se = noise * np.sqrt(1 / first.size + 1 / second.size)
    return drop, drop / se if se > 0 else (np.inf if drop > 0 else 0.0)


def check_svi_loss(losses: np.ndarray, what: str = "emdppl.SVI") -> list[str]:
    """A message when the SVI loss ``losses (num_steps,)`` (-ELBO per step) was still falling at
    the end of the run (:func:`loss_drop`: more than :data:`MIN_LOSS_DROP` nats and
    :data:`MAX_LOSS_DROP_Z` standard errors between the last two fifths); runs shorter than 50
    steps are not judged."""
    losses = np.asarray(losses, float)
    if losses.shape[0] < 50 or not np.isfinite(losses).all():
        return []
    drop, z = loss_drop(losses)
    if drop <= MIN_LOSS_DROP or z <= MAX_LOSS_DROP_Z:
        return []
    return [
        f"the loss (-ELBO) was still falling at the end of the run: its mean over the last "
        f"fifth of the {losses.shape[0]} steps is {drop:.3g} nats below that over the fifth "
        f"before ({z:.1f} standard errors of the step noise), so the guide has not converged. "
        f"Raise num_steps ({what}(..., num_steps=...)) or the learning rate "
        "(optimizer=emdppl.svi.default_optimizer(num_steps, learning_rate=...))."
    ]


def check_guide_scales(ratios: dict, guide: str) -> list[str]:
    r"""A message naming the latent coordinates whose guide sd is below :data:`MIN_SCALE_RATIO`
    of the sd implied by the posterior's curvature averaged over the guide.

    Parameters
    ----------
    ratios
        ``{site: array of the site's shape}``: guide marginal sd over
        :math:`\sqrt{(\bar H^{-1})_{ii}}`, :math:`\bar H` the guide's mean of the negative
        Hessian of the log joint, on the unconstrained (auxiliary) latents; NaN where not checked.
    guide
        The guide's name (for the advice).
    """
    names, values = _scalars({k: np.asarray(v, float)[None, None] for k, v in ratios.items()})
    values = values[0, 0]
    bad = values < MIN_SCALE_RATIO
    if not bad.any():
        return []
    richer = (
        "a richer guide (emdppl.SVI('auto_multivariate_normal') or "
        "'auto_lowrank_multivariate_normal'), "
        if guide == "auto_normal"
        else ""
    )
    return [
        f"the guide's sd collapsed for {int(bad.sum())} of {bad.size} latent coordinates "
        f"(guide sd / the sd the posterior's curvature under the guide implies: "
        f"{_worst(names, values, bad, False)}; "
        f"below {MIN_SCALE_RATIO}): the draws understate the posterior's spread there (a "
        "Gaussian guide squeezed across a ridge, e.g. the local scales of a horseshoe). Use "
        f"{richer}the auxiliary form (auxiliary=True) if it is off, or MCMC "
        "(emdppl.MCMC('nuts'))."
    ]


def warn(messages: list[str], what: str) -> None:
    """One ``RuntimeWarning`` listing every message, at the caller's line."""
    if not messages:
        return
    body = "\n".join(f"  - {m}" for m in messages)
    warnings.warn(
        f"{what}: {len(messages)} problem(s) found:\n{body}\n(also in idata.attrs['warnings'])",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )
