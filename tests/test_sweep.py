"""Correct or loud, at default settings: a subset of ``benchmarks/sweep.py`` that runs in CI.

The regression of the issue (5 predictors of scale 200, ``beta ~ N(0, 10)``, ``sigma ~
HalfNormal(10)``; exact moments by quadrature) and posteriordb's ``kidscore_interaction_c``
(flat priors, ``dist.ImproperUniform``), each with ``mala``, ``barker`` and ``mclmc`` at their
defaults (4 chains, 1000 warm-up + 1000 draws, seed 0). Every cell must agree with its
reference or carry emdppl's warning; on the regression MALA and Barker must agree.

Agreement is ``benchmarks.sweep.agreement``: for every scalar ``|z| < 4`` on the mean and on
E[x^2] (z from the run's MCSE and the reference's) and ``|log(sd / sd_ref)| < 0.1`` (or
4 relative MCSEs of the run's sd, where wider).
A correct sampler fails a z-check with two-sided probability 6.3e-5, so a cell of ``k`` scalars
falsely disagrees with probability at most ``2 k * 6.3e-5`` (7.6e-4 for the 6 scalars here).
The tests also show the checks have power: the same draws with one coordinate shifted by 5 of
its MCSE, or with the sds 25% too large, are rejected.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import emdppl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import sweep  # noqa: E402

POSTERIORS = ("regression", "kidscore_interaction_c")
SAMPLERS = ("mala", "barker", "mclmc")


def _run(name: str, sampler: str):
    posterior = sweep.POSTERIORS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = emdppl.infer(
            posterior.model,
            emdppl.MCMC(sampler),
            model_kwargs=posterior.load_kwargs(),
            rng_key=0,
            progress_bar=False,
        )
    raised = [
        w
        for w in caught
        if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("emdppl.")
    ]
    reference = posterior.reference()
    draws = {k: np.asarray(idata.posterior[k].values) for k in reference.mean}
    warned = bool(sweep._attrs_warnings(idata) or raised)
    return draws, reference, warned


@pytest.fixture(scope="module")
def cells():
    return {(name, sampler): _run(name, sampler) for name in POSTERIORS for sampler in SAMPLERS}


@pytest.mark.parametrize("name", POSTERIORS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_agrees_or_warns(cells, name, sampler):
    draws, reference, warned = cells[name, sampler]
    score = sweep.agreement(draws, reference)
    label = sweep.cell_label(score["agrees"], warned)
    assert label != "SILENT WRONG", f"{name} x {sampler}: wrong without a warning: {score}"


@pytest.mark.parametrize("sampler", ["mala", "barker"])
def test_regression_is_right(cells, sampler):
    draws, reference, _ = cells["regression", sampler]
    score = sweep.agreement(draws, reference)
    assert score["agrees"], f"{sampler} on the regression: {score}"
    assert score["sd_within_10_percent"], score


def test_the_checks_have_power(cells):
    """A 5-MCSE shift of one mean, or sds 25% too large, fails the same draws."""
    import arviz as az

    draws, reference, _ = cells["regression", "mala"]
    assert sweep.agreement(draws, reference)["agrees"]
    mcse = float(az.mcse(draws["sigma"], method="mean"))
    shifted = {**draws, "sigma": draws["sigma"] + 5 * mcse}
    assert not sweep.agreement(shifted, reference)["agrees"]
    centre = {k: v.mean(axis=(0, 1)) for k, v in draws.items()}
    wide = {k: centre[k] + 1.25 * (v - centre[k]) for k, v in draws.items()}
    assert not sweep.agreement(wide, reference)["agrees"]
