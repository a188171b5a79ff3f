"""emdppl's results carry the whole ArviZ workflow: the groups of ``az.from_numpyro`` (the
model's own sites in ``posterior``, the auxiliary ones in ``unconstrained_posterior``,
``log_likelihood``, ``observed_data``, ``constant_data``, predictive groups), dims from plates,
several chains for SVI and EMD; LOO, WAIC, compare, the PPC/LOO-PIT/trace/pair plots and a
netCDF round trip on MCMC, SVI and EMD; LOO against NumPyro's own NUTS; Pyro models."""

import datetime
import warnings

import matplotlib

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402

import emdppl  # noqa: E402
from emdppl.inference_data import add_model_groups  # noqa: E402
from emdppl.models import EIGHT_SCHOOLS, eight_schools  # noqa: E402

AZ1 = int(az.__version__.split(".")[0]) >= 1  # arviz 1.x: the arviz-stats/arviz-plots API

DATA = dict(sigma=EIGHT_SCHOOLS["sigma"], y=EIGHT_SCHOOLS["y"])
SCHOOLS = ["A", "B", "C", "D", "E", "F", "G", "H"]
NUTS = dict(num_warmup=300, num_samples=300, num_chains=4, target_accept=0.9)
ALGORITHMS = ("mcmc", "svi", "emd")


def pooled(sigma, y=None):
    """Complete pooling: one effect for every school."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("J", len(sigma)):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def _infer(model, algorithm, **options):
    return emdppl.infer(model, algorithm, model_kwargs=DATA, rng_key=0, progress_bar=False,
                        **options)


@pytest.fixture(scope="module")
def results():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a rare divergence is not the point
        return {
            "mcmc": _infer(eight_schools, emdppl.MCMC("nuts", **NUTS), posterior_predictive=True,
                           prior=True, num_prior_draws=400),
            "svi": _infer(eight_schools, emdppl.SVI("auto_multivariate_normal", num_steps=1500,
                                                    num_samples=400), posterior_predictive=True),
            "emd": _infer(eight_schools, emdppl.EMD(num_steps=50, num_samples=400),
                          posterior_predictive=True),
        }


def _elpd(elpd_data) -> tuple[float, float]:
    """(elpd, p) of az.loo's result, whose fields arviz 1.x renamed."""
    if AZ1:
        return elpd_data.elpd, elpd_data.p
    return elpd_data.elpd_loo, elpd_data.p_loo


def _groups(idata) -> set[str]:
    return set(idata.children) if hasattr(idata, "children") else set(idata.groups())


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", ALGORITHMS)
def test_groups_sites_and_dims(results, name):
    idata = results[name]
    assert {
        "posterior",
        "unconstrained_posterior",
        "log_likelihood",
        "posterior_predictive",
        "observed_data",
        "constant_data",
    } <= _groups(idata)
    post, aux = idata.posterior, idata.unconstrained_posterior
    # what the user wrote, in the model's order; the auxiliary noise in its own group
    assert list(post.data_vars) == ["mu", "tau", "theta"]
    assert set(aux.data_vars) == {"mu_decentered", "tau_decentered", "theta_decentered"}
    assert post.sizes["chain"] >= 2
    assert post["theta"].dims == ("chain", "draw", "J")
    assert aux["theta_decentered"].dims == ("chain", "draw", "J")
    np.testing.assert_array_equal(post["J"], np.arange(8))
    np.testing.assert_allclose(
        post["theta"], post["mu"] + post["tau"] * aux["theta_decentered"], rtol=1e-4, atol=1e-4
    )
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "J")
    assert idata.log_likelihood["y"].shape == post["theta"].shape
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "J")
    assert idata.observed_data["y"].dims == ("J",)
    np.testing.assert_array_equal(idata.observed_data["y"], DATA["y"])
    assert list(idata.constant_data.data_vars) == ["sigma"]
    np.testing.assert_array_equal(idata.constant_data["sigma"], DATA["sigma"])
    attrs = post.attrs
    assert attrs["algorithm"] == name and attrs["backend"] == "numpyro"
    assert attrs["inference_library"] == "emdppl"
    assert attrs["inference_library_version"] == emdppl.__version__
    assert datetime.datetime.fromisoformat(attrs["created_at"]).tzinfo is not None
    assert attrs["numpyro_version"] and attrs["arviz_version"]
    summary = az.summary(idata)  # the user's sites only
    assert {i.partition("[")[0] for i in summary.index} == {"mu", "tau", "theta"}
    assert np.all(np.isfinite(summary["r_hat"]))


def test_log_likelihood_is_the_pointwise_normal_density(results):
    idata = results["mcmc"]
    theta = idata.posterior["theta"].values
    sigma, y = DATA["sigma"], DATA["y"]
    expected = -0.5 * ((y - theta) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(idata.log_likelihood["y"], expected, rtol=1e-5, atol=1e-5)


def test_predictive_groups_are_conditioned_draws(results):
    """y_rep - theta at the same draw is N(0, sigma): its sd / sigma is 1 within 4 sds of the
    sample sd (1/sqrt(2n)); the prior of mu is N(0, 5): its mean is 0 within 4 sds."""
    idata = results["mcmc"]
    residual = (idata.posterior_predictive["y"] - idata.posterior["theta"]).values
    n = residual.shape[0] * residual.shape[1]
    ratio = residual.reshape(n, 8).std(0) / DATA["sigma"]
    np.testing.assert_array_less(np.abs(ratio - 1), 4 / np.sqrt(2 * n))
    prior, prior_predictive = idata.prior, idata.prior_predictive
    assert list(prior.data_vars) == ["mu", "tau", "theta"] and prior.sizes["draw"] == 400
    assert prior["theta"].dims == ("chain", "draw", "J")
    assert prior_predictive["y"].shape == (1, 400, 8)
    assert abs(float(prior["mu"].mean())) < 4 * 5 / np.sqrt(400)
    assert float(prior["tau"].min()) > 0


def test_independent_draws_are_split_into_chains(results):
    for name in ("svi", "emd"):
        assert results[name].posterior["theta"].shape == (4, 100, 8), name
    loss = results["svi"].svi_trace["loss"]
    assert loss.shape == (1, 1500)
    with pytest.raises(ValueError, match="multiple of num_chains"):
        emdppl.SVI(num_samples=10, num_chains=4)


# ----------------------------------------------------------------------------- workflow


@pytest.mark.parametrize("name", ALGORITHMS)
def test_arviz_workflow(results, name, tmp_path):
    idata = results[name]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*posterior variance of the log predictive")
        warnings.filterwarnings("ignore", message=".*Estimated shape parameter of Pareto")
        warnings.filterwarnings("ignore", message="Divergences data not found")  # SVI, EMD
        loo = az.loo(idata)
        assert np.isfinite(_elpd(loo)[0])
        if not AZ1:  # arviz 1.x has no WAIC
            assert np.isfinite(az.waic(idata).elpd_waic)
        assert loo.n_data_points == 8
        for diagnostic in (az.rhat, az.ess, az.mcse):  # NaN ("Shape validation failed") for
            values = diagnostic(idata)  # a single chain
            assert all(np.all(np.isfinite(values[k])) for k in values.data_vars), diagnostic
        if AZ1:
            az.plot_ppc_dist(idata, num_samples=50)
            az.plot_loo_pit(idata, var_names=["y"])
        else:
            az.plot_ppc(idata, num_pp_samples=50)
            az.plot_loo_pit(idata, y="y")
        az.plot_trace(idata, var_names=["mu", "tau"])
        divergences = {"visuals": {"divergence": True}} if AZ1 else {"divergences": True}
        az.plot_pair(idata, var_names=["mu", "tau", "theta"], coords={"J": [0]}, **divergences)
        plt.close("all")
    path = tmp_path / f"{name}.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert _groups(back) == _groups(idata)
    np.testing.assert_array_equal(back.posterior["theta"], idata.posterior["theta"])
    np.testing.assert_array_equal(back.log_likelihood["y"], idata.log_likelihood["y"])
    assert back.posterior["theta"].dims == ("chain", "draw", "J")
    assert back.posterior.attrs["algorithm"] == name


def test_compare_hierarchical_and_pooled(results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pooled_idata = _infer(pooled, emdppl.MCMC("nuts", **NUTS))
    assert list(pooled_idata.posterior.data_vars) == ["mu"]
    assert "unconstrained_posterior" in _groups(pooled_idata)
    comparison = az.compare({"hierarchical": results["mcmc"], "pooled": pooled_idata})
    assert set(comparison.index) == {"hierarchical", "pooled"}
    assert np.all(np.isfinite(comparison["elpd" if AZ1 else "elpd_loo"]))
    assert np.all(comparison["weight"] >= 0)


def test_elpd_loo_agrees_with_numpyro_nuts(results):
    """emdppl's NUTS and NumPyro's own NUTS (through az.from_numpyro) on eight schools (in
    auxiliary form for both: the centered form diverges) estimate the same elpd_loo: their
    difference is Monte-Carlo error only, far below the SE of elpd_loo (which measures the
    spread over the 8 data points); 2 SE is the bound."""
    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(emdppl.auxiliary(eight_schools), target_accept_prob=0.9),
        num_warmup=NUTS["num_warmup"],
        num_samples=NUTS["num_samples"],
        num_chains=NUTS["num_chains"],
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(1), **DATA)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Estimated shape parameter of Pareto")
        reference = az.loo(az.from_numpyro(mcmc, log_likelihood=True))
        ours = az.loo(results["mcmc"])
    (ours_elpd, ours_p), (ref_elpd, ref_p) = _elpd(ours), _elpd(reference)
    print(f"elpd_loo: emdppl {ours_elpd:.3f} ({ours.se:.3f}), numpyro {ref_elpd:.3f}")
    assert abs(ours_elpd - ref_elpd) < 2 * reference.se
    assert abs(ours_p - ref_p) < 2 * reference.se


# ----------------------------------------------------------------------------- dims


def test_dims_and_coords_override_the_plates(results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = _infer(
            eight_schools,
            emdppl.MCMC("nuts", **NUTS),  # compiled for the fixture already
            dims={"theta": ["school"], "y": ["school"], "sigma": ["school"]},
            coords={"school": SCHOOLS},
        )
    assert idata.posterior["theta"].dims == ("chain", "draw", "school")
    assert list(idata.posterior["school"].values) == SCHOOLS
    assert idata.unconstrained_posterior["theta_decentered"].dims == ("chain", "draw", "J")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "school")
    assert idata.observed_data["y"].dims == ("school",)
    assert idata.constant_data["sigma"].dims == ("school",)
    labelled = add_model_groups(
        results["mcmc"], emdppl.Problem.of(eight_schools, model_kwargs=DATA),
        coords={"J": SCHOOLS},
    )
    assert list(labelled.posterior["J"].values) == SCHOOLS
    assert float(labelled.posterior["theta"].sel(J="C").mean()) == pytest.approx(
        float(results["mcmc"].posterior["theta"][..., 2].mean())
    )
    with pytest.raises(ValueError, match=r"coords\['school'\] has 3 values"):
        add_model_groups(results["mcmc"], emdppl.Problem.of(eight_schools, model_kwargs=DATA),
                         dims={"theta": ["school"]}, coords={"school": SCHOOLS[:3]})
    with pytest.raises(TypeError, match="dims must map variable names to lists"):
        emdppl.infer(eight_schools, "nuts", model_kwargs=DATA, dims={"theta": "school"})


def nested(y):
    """Two nested plates, an event dim without a name, and one with ArviZ's event_dims."""
    with numpyro.plate("group", 3, dim=-2), numpyro.plate("item", 4, dim=-1):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    v = numpyro.sample(
        "v", dist.Normal(0.0, 1.0).expand([5]).to_event(1), infer={"event_dims": ["basis"]}
    )
    with numpyro.plate("item", 4, dim=-1):
        total = numpyro.deterministic("total", z.sum(0) + w.sum() + v.sum())
        numpyro.sample("y", dist.Normal(total, 1.0), obs=y)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 20 draws do not converge: not the point
def test_dims_from_nested_plates_event_dims_and_unnamed_axes():
    y = np.arange(4.0)
    problem = emdppl.Problem.of(nested, model_args=(y,))
    dims = problem.model_data().dims
    assert dims["z"] == ("group", "item")
    assert dims["w"] == (None,) and dims["v"] == ("basis",)
    assert dims["total"] == ("item",) and dims["y"] == ("item",)
    assert dims["z_decentered"] == ("group", "item")
    idata = emdppl.infer(nested, emdppl.MCMC("mala", num_warmup=0, num_samples=20),
                         model_args=(y,), progress_bar=False)
    post = idata.posterior
    assert list(post.data_vars) == ["z", "w", "v", "total"]
    assert post["z"].dims == ("chain", "draw", "group", "item")
    assert post["w"].dims == ("chain", "draw", "w_dim_0")
    assert post["v"].dims == ("chain", "draw", "basis")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "item")
    assert "constant_data" not in _groups(idata)  # y is the only argument, and observed


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_target_gets_only_what_exists():
    target = emdppl.Target.from_logdensity(
        lambda p: -0.5 * (p["x"] ** 2).sum(), {"x": np.zeros(2)}, num_chains=2
    )
    algorithm = emdppl.MCMC("mala", num_warmup=0, num_samples=20, num_chains=2)
    idata = emdppl.infer(target, algorithm, progress_bar=False, dims={"x": ["coord"]})
    assert _groups(idata) == {"posterior", "sample_stats"}
    assert idata.posterior["x"].dims == ("chain", "draw", "coord")
    assert idata.posterior.attrs["backend"] == "target"
    with pytest.raises(ValueError, match="need a model's observed sites"):
        emdppl.infer(target, algorithm, posterior_predictive=True)


# ----------------------------------------------------------------------------- Pyro


def test_pyro_model_has_the_numpyro_twins_groups_and_log_likelihood():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pdist

    def pyro_eight_schools(sigma, y=None):
        mu = pyro.sample("mu", pdist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", pdist.HalfCauchy(5.0))
        with pyro.plate("J", len(sigma)):
            theta = pyro.sample("theta", pdist.Normal(mu, tau))
            pyro.sample("y", pdist.Normal(theta, sigma), obs=y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = _infer(
            pyro_eight_schools,
            emdppl.MCMC("nuts", num_warmup=50, num_samples=50, num_chains=1),
            posterior_predictive=True,
            prior=True,
            num_prior_draws=100,
        )
    assert idata.posterior.attrs["backend"] == "pyro"
    assert list(idata.posterior.data_vars) == ["mu", "tau", "theta"]
    assert set(idata.unconstrained_posterior.data_vars) == {
        "mu_decentered", "tau_decentered", "theta_decentered"
    }
    for group, name in (("posterior", "theta"), ("unconstrained_posterior", "theta_decentered"),
                        ("log_likelihood", "y"), ("posterior_predictive", "y"), ("prior", "theta"),
                        ("prior_predictive", "y")):
        assert idata[group][name].dims == ("chain", "draw", "J"), group
    assert idata.observed_data["y"].dims == ("J",)
    np.testing.assert_array_equal(idata.constant_data["sigma"], DATA["sigma"])
    # the same draws through the NumPyro twin's path give the same pointwise log likelihood
    latents = {k: idata.posterior[k].values for k in ("mu", "tau", "theta")}
    twin = emdppl.Problem.of(eight_schools, model_kwargs=DATA).log_likelihood(latents)
    np.testing.assert_allclose(idata.log_likelihood["y"], twin["y"], rtol=1e-5)
    residual = (idata.posterior_predictive["y"] - idata.posterior["theta"]).values.reshape(50, 8)
    assert np.all(np.abs(residual) < 6 * DATA["sigma"])  # y_rep ~ N(theta, sigma) at the draw


def test_pyro_log_likelihood_without_plates_runs_draw_by_draw():
    """Batch dims not in a plate cannot be vectorised over draws: one run per draw, the same
    values as NumPyro's."""
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pdist

    y = np.linspace(-1.0, 2.0, 5)

    def pyro_model(y):
        mu = pyro.sample("mu", pdist.Normal(0.0, 1.0))
        pyro.sample("y", pdist.Normal(mu, 1.0).expand([5]), obs=y)

    def numpyro_model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0).expand([5]), obs=y)

    latents = {"mu": np.random.default_rng(0).normal(size=(2, 7)).astype(np.float32)}
    values = {
        backend: emdppl.Problem.of(model, model_args=(y,)).log_likelihood(latents)["y"]
        for backend, model in (("pyro", pyro_model), ("numpyro", numpyro_model))
    }
    assert values["pyro"].shape == (2, 7, 5)
    np.testing.assert_allclose(values["pyro"], values["numpyro"], rtol=1e-5)
