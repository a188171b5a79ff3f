"""emdppl.SVI's post-fit checks and compiled-code reuse: a guide collapsed on the horseshoe warns,
healthy fits of other models stay silent, a run stopped early warns, the warnings are recorded,
and a second ``infer`` on new data of the same shapes does not retrace."""

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import emdppl
from emdppl.diagnostics import check_svi_loss, loss_drop
from emdppl.models import eight_schools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import horseshoe_regression  # noqa: E402

# steps of the runs measured in benchmarks/README.md (SVI checks): the default for the healthy
# and horseshoe fits, and a run 25x too short
HEALTHY_STEPS = HORSESHOE_STEPS = 5000
SHORT_STEPS = 200
SCHOOLS = dict(
    sigma=np.array([15.0, 10, 16, 11, 9, 11, 10, 18]), y=np.array([28.0, 8, -3, 7, -1, 1, 18, 12])
)


def horseshoe_data(seed: int, num_data: int = 100, num_features: int = 32) -> dict:
    """Three active features (2, -1, 0.5), noise sd 0.05, as in NumPyro's example."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_data, num_features))
    Y = X[:, :3] @ np.array([2.0, -1.0, 0.5])
    Y = Y - Y.mean() + 0.05 * rng.normal(size=num_data)
    return dict(X=X.astype(np.float32), Y=Y.astype(np.float32))


def regression(X, y):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def logistic(X, y):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 3.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def regression_data(seed: int, num_data: int = 80, num_features: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_data, num_features))
    y = 0.5 + X @ rng.normal(size=num_features) + 0.7 * rng.normal(size=num_data)
    return dict(X=X.astype(np.float32), y=y.astype(np.float32))


def logistic_data(seed: int, num_data: int = 200, num_features: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_data, num_features))
    p = 1 / (1 + np.exp(-(0.3 + X @ rng.normal(size=num_features))))
    return dict(X=X.astype(np.float32), y=(rng.uniform(size=num_data) < p).astype(np.float32))


# ----------------------------------------------------------------------------- guide scales


def test_horseshoe_collapse_warns_and_is_recorded():
    """Mean field on the horseshoe's ridge (tau * lambda_j * beta_j fixed by the data for the
    three active features): their guide sds fall below MIN_SCALE_RATIO of the Laplace sd."""
    collapse = r"(?s)emdppl\.SVI\('auto_normal'\).*sd collapsed"
    with pytest.warns(RuntimeWarning, match=collapse) as rec:
        idata = emdppl.infer(
            horseshoe_regression,
            emdppl.SVI("auto_normal", num_steps=HORSESHOE_STEPS, num_samples=400),
            model_kwargs=horseshoe_data(0),
            rng_key=0,
            progress_bar=False,
        )
    (message,) = [str(w.message) for w in rec if "collapsed" in str(w.message)]
    # in every fit measured: tau and the active lambdas and unscaled_betas (7 coordinates) are
    # collapsed, tau and lambdas[0] among the 5 worst
    count = int(re.search(r"collapsed for (\d+) of 66 latent coordinates", message).group(1))
    assert count >= 7, message
    assert "tau_decentered[0]" in message and "lambdas_decentered[0]" in message
    assert "auto_multivariate_normal" in message
    recorded = json.loads(idata.posterior.attrs["warnings"])  # attrs hold JSON (netCDF-safe)
    assert len(recorded) == len(message.split("\n  - ")) - 1
    assert any("sd collapsed" in m for m in recorded)


@pytest.mark.parametrize(
    "model, data, guide",
    [
        (eight_schools, SCHOOLS, "auto_normal"),
        (regression, regression_data(1), "auto_normal"),
        (logistic, logistic_data(2), "auto_normal"),
        (eight_schools, SCHOOLS, "auto_multivariate_normal"),
    ],
    ids=["eight_schools", "regression", "logistic", "eight_schools_mvn"],
)
def test_healthy_fits_are_silent(model, data, guide):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = emdppl.SVI(guide, num_steps=HEALTHY_STEPS).fit(
            0, model, model_kwargs=data, progress_bar=False
        )
    assert result.warnings == []


# ----------------------------------------------------------------------------- loss


def test_short_run_warns():
    with pytest.warns(RuntimeWarning, match=r"still falling.*num_steps") as rec:
        result = emdppl.SVI("auto_normal", num_steps=SHORT_STEPS).fit(
            0, regression, model_kwargs=regression_data(1), progress_bar=False
        )
    assert len(rec) == 1 and result.warnings and "still falling" in result.warnings[0]


def test_loss_drop_statistic():
    """On white noise around a plateau z ~ N(0, 1) (its mean and sd checked to 4 standard
    errors over 200 runs, p ~ 1e-4). A linear trend of 2 nats over the last 40% of 1000 steps
    drops 1 nat between the windows, z = 1 / (s sqrt(2 / 200)) = 100 for noise s = 0.1."""
    rng = np.random.default_rng(0)
    plateau = 10 + rng.normal(size=(200, 1000))
    z = np.array([loss_drop(x)[1] for x in plateau])
    assert abs(z.mean()) < 4 / np.sqrt(200) and abs(z.std() - 1) < 4 / np.sqrt(2 * 200)
    trend = 10 - np.linspace(0, 5, 1000) + 0.1 * rng.normal(size=1000)
    drop, z = loss_drop(trend)
    assert abs(drop - 1) < 0.05 and 80 < z < 120
    assert check_svi_loss(trend) and not any(check_svi_loss(x) for x in plateau)


# ----------------------------------------------------------------------------- retracing


@pytest.mark.filterwarnings("ignore:emdppl.SVI:RuntimeWarning")  # 300 steps: still falling
def test_second_infer_does_not_retrace():
    traces = []

    def counted(sigma, y=None):
        traces.append(1)  # runs only while JAX traces the model
        eight_schools(sigma, y)

    first = emdppl.infer(
        counted,
        emdppl.SVI("auto_normal", num_steps=300, num_samples=400),
        model_kwargs=SCHOOLS,
        rng_key=0,
        progress_bar=False,
    )
    n = len(traces)
    assert n > 0
    second = emdppl.infer(  # a new SVI of the same settings, new data of the same shapes
        counted,
        emdppl.SVI("auto_normal", num_steps=300, num_samples=400),
        model_kwargs=dict(SCHOOLS, y=SCHOOLS["y"] + 5),
        rng_key=1,
        progress_bar=False,
    )
    assert len(traces) == n
    assert (
        second.posterior.attrs["compile_seconds"] < 0.1 * first.posterior.attrs["compile_seconds"]
    )
    assert not np.allclose(first.posterior["mu"], second.posterior["mu"])
