"""Stan's checks after every run: each fires on a run that has the problem and stays quiet on
one that does not (fixed seeds; thresholds as Stan's)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emdppl
from emdppl import diagnostics


def test_rhat_and_ess_of_independent_chains_pass_and_of_shifted_chains_fail():
    rng = np.random.default_rng(0)
    good = {"x": rng.normal(size=(4, 1000, 3))}
    assert diagnostics.check_mcmc(good, {}, "nuts") == []
    summary = diagnostics.rhat_ess(good["x"])
    # iid draws: R-hat ~ 1 (sd ~ 1/sqrt(4000)), ESS ~ 4000 (bulk)
    assert np.all(summary["rhat"] < 1.01) and np.all(summary["ess_bulk"] > 3000)
    shifted = good["x"] + np.arange(4)[:, None, None] * 0.5  # chains that disagree
    messages = diagnostics.check_mcmc({"x": shifted}, {}, "mala")
    assert any("R-hat above 1.01 for 3 of 3 scalars (x[" in m for m in messages), messages
    sticky = np.repeat(rng.normal(size=(4, 10)), 100, axis=1)  # ESS ~ 40 of 4000
    messages = diagnostics.check_mcmc({"mu": sticky}, {}, "mala")
    expected = "ess bulk below 100 per chain for 1 of 1 scalars (mu "
    assert any(m.startswith(expected) for m in messages), messages


def test_stats_checks():
    rng = np.random.default_rng(1)
    x = {"x": rng.normal(size=(2, 500))}
    stats = {
        "diverging": np.zeros((2, 500), bool),
        "energy": np.cumsum(rng.normal(size=(2, 500)) * 0.05, axis=1),  # a random walk: E-BFMI ~0
        "tree_depth": np.full((2, 500), 10),
        "step_size": np.full((2, 500), 5e-6),
    }
    stats["diverging"][0, :3] = True
    messages = diagnostics.check_mcmc(x, stats, "nuts", is_auxiliary=False, max_tree_depth=10)
    text = "\n".join(messages)
    assert "3 of 1000 transitions diverged" in text and "sample the auxiliary form" in text
    assert "E-BFMI below 0.3 in chains [0, 1]" in text
    assert "100% of NUTS trees hit the maximum depth 10" in text
    assert "step size collapsed to [5e-06, 5e-06]" in text
    auxiliary = diagnostics.check_mcmc(x, {"diverging": stats["diverging"]}, "nuts")
    (divergence,) = [m for m in auxiliary if "diverged" in m]
    assert "sample the auxiliary form" not in divergence and "target_accept=0.95" in divergence
    # a run already at 0.95 is told 0.99; one at 0.99 is told to reparametrise only
    (at_95,) = [m for m in diagnostics.check_mcmc(
        x, {"diverging": stats["diverging"]}, "nuts", target_accept=0.95) if "diverged" in m]
    assert "target_accept=0.99" in at_95
    (at_99,) = [m for m in diagnostics.check_mcmc(
        x, {"diverging": stats["diverging"]}, "nuts", target_accept=0.99) if "diverged" in m]
    assert "target_accept" not in at_99 and "reparametrise" in at_99


def test_constrained_nan_is_named():
    draws = {"theta": np.full((2, 5, 3), np.nan), "mu": np.zeros((2, 5))}
    (message,) = diagnostics.check_constrained(draws)
    assert "['theta'] are NaN/inf on the constrained scale" in message


def test_one_warning_at_the_callers_line():
    target = emdppl.Target.from_logdensity(lambda x: -0.5 * jnp.sum(x**2), jnp.zeros(2),
                                           num_chains=2)
    stuck = emdppl.MCMC("mala", num_warmup=0, num_samples=50, num_chains=2, step_size=1e-4)
    with pytest.warns(RuntimeWarning, match=r"emdppl.MCMC\('mala'\): \d problem\(s\)") as record:
        result = stuck.sample(jax.random.key(0), target, progress_bar=False)
    assert len(record) == 1 and record[0].filename == __file__
    assert any("ess bulk" in m for m in result.warnings)
    healthy = emdppl.MCMC("nuts", num_warmup=300, num_samples=500, num_chains=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert healthy.sample(0, target.with_initial_position(jnp.zeros((4, 2))),
                              progress_bar=False).warnings == []
