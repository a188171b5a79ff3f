"""The horseshoe's Gibbs reference (``benchmarks/horseshoe_gibbs.py``) samples the model's
posterior: Geweke's (2004) joint-distribution test. Alternating a Gibbs sweep given ``y`` with a
fresh ``y`` from the likelihood leaves the prior invariant, so the chain's long-run averages of
prior functionals must match their prior values; a wrong conditional (shape, rate, a missing
factor) moves them."""

import numpy as np

from benchmarks.horseshoe_gibbs import initial_state, model_sites, sweep

NUM_CHAINS, NUM_ITERATIONS, BURN_IN = 64, 4000, 500
#: |z| bound per functional: two-sided p = 6e-5 each, 5e-4 for the family of eight.
Z_BOUND = 4.0


def _geweke_chain(seed: int) -> dict[str, np.ndarray]:
    """Per-chain averages of prior functionals over the successive-conditional chain."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 2))
    state = initial_state(rng, NUM_CHAINS, x.shape[1])
    beta = np.sqrt(state[1] * state[3][:, None]) * rng.standard_normal((NUM_CHAINS, 2))
    phi = rng.gamma(3.0, size=NUM_CHAINS)
    state = (beta, *state[1:5], phi)
    sums: dict[str, np.ndarray] = {}
    for it in range(NUM_ITERATIONS):
        y = state[0] @ x.T + rng.standard_normal((NUM_CHAINS, 6)) / np.sqrt(state[5])[:, None]
        state = sweep(rng, state, x, y)
        if it < BURN_IN:
            continue
        sites = model_sites(*state)
        functionals = {
            "prec_obs": sites["prec_obs"],
            "tau < 1": (sites["tau"][:, 0] < 1).astype(float),
            "lambda_0 < 1": (sites["lambdas"][:, 0] < 1).astype(float),
            "lambda_1 < 3": (sites["lambdas"][:, 1] < 3).astype(float),
            "unscaled_beta_0": sites["unscaled_betas"][:, 0],
            "unscaled_beta_1^2": sites["unscaled_betas"][:, 1] ** 2,
            "log tau": np.log(sites["tau"][:, 0]),
            "tau lambda_0 < 1": (sites["tau"][:, 0] * sites["lambdas"][:, 0] < 1).astype(float),
        }
        for k, v in functionals.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / (NUM_ITERATIONS - BURN_IN) for k, v in sums.items()}


#: Prior values: Gamma(3, 1) mean; half-Cauchy(1) P(< 1) = 1/2, P(< 3) = 2 atan(3) / pi;
#: N(0, 1) mean and second moment; E log |Cauchy| = 0; the product of two independent
#: half-Cauchys is below 1 with probability 1/2 (log of it is symmetric about 0).
PRIOR = {
    "prec_obs": 3.0,
    "tau < 1": 0.5,
    "lambda_0 < 1": 0.5,
    "lambda_1 < 3": 2 * np.arctan(3.0) / np.pi,
    "unscaled_beta_0": 0.0,
    "unscaled_beta_1^2": 1.0,
    "log tau": 0.0,
    "tau lambda_0 < 1": 0.5,
}


def test_gibbs_sweep_leaves_the_prior_invariant():
    averages = _geweke_chain(seed=0)
    for name, prior_value in PRIOR.items():
        per_chain = averages[name]
        se = per_chain.std(ddof=1) / np.sqrt(NUM_CHAINS)
        z = (per_chain.mean() - prior_value) / se
        assert abs(z) < Z_BOUND, f"{name}: {per_chain.mean():.4f} vs {prior_value:.4f} (z {z:.1f})"
