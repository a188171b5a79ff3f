"""SVI's ELBO particles and posterior draws over 4 fake CPU devices, in a fresh subprocess:
placement (state replicated, draws split), a gradient all-reduce in the compiled step, the same
fit as on one device, and bad splits refused before anything runs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import emdppl

SCRIPT = textwrap.dedent(
    """
    import json, re, warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # a short fit: the convergence warning
    import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    import emdppl
    from emdppl import driver, sharding, svi as svi_module

    out = {"num_devices": len(jax.devices())}
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)); y = X @ np.array([1.0, -2.0]) + rng.normal(size=50)

    def model(X, y):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
        numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)

    fits = {}
    for d in (None, 4):
        svi = emdppl.SVI("auto_normal", num_steps=300, num_particles=8, devices=d)
        fits[d] = svi.fit(2, model, model_kwargs=dict(X=X, y=y), progress_bar=False)
    out["param_max_diff"] = max(
        float(np.max(np.abs(np.asarray(fits[4].params[k]) - np.asarray(fits[None].params[k]))))
        for k in fits[None].params)
    out["losses"] = {str(d): np.asarray(f.losses).tolist() for d, f in fits.items()}
    leaf = jax.tree.leaves(fits[4].state.optim_state)[1]
    out["state_replicated"] = leaf.sharding.spec == jax.sharding.PartitionSpec()
    out["state_devices"] = len(leaf.sharding.device_set)
    draws = fits[4].sample_posterior(5, 400)["beta"]
    out["draws_spec"] = draws.sharding.spec == jax.sharding.PartitionSpec("particle")
    out["draw_rows"] = sorted({s.data.shape[0] for s in draws.addressable_shards})
    one = np.asarray(fits[None].sample_posterior(5, 400)["beta"])
    out["draws_max_diff"] = float(np.max(np.abs(np.asarray(draws) - one)))

    # the compiled chunk: the particles are split, so the ELBO's mean over them is an all-reduce
    mesh = sharding.particle_mesh(4, 8)
    setup = svi_module._Setup(model, True, "auto_normal", fits[4].setup.optimizer, "elbo", 8, mesh)
    algorithm = svi_module._algorithm(setup, (), dict(X=X, y=y))
    state = svi_module._initial_state(algorithm.init, None, jax.random.key(0), jax.random.key(1))
    text = driver._chunk.lower(
        algorithm, state, jax.random.key(1), jnp.asarray(0), 10, 1).compile().compiled.as_text()
    out["collectives"] = sorted(set(re.findall(
        r"all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter", text)))

    idata = emdppl.infer(model, emdppl.SVI(num_steps=200, num_particles=4, devices="all"),
                         model_kwargs=dict(X=X, y=y), progress_bar=False)
    devices = idata.posterior.attrs["devices"]  # netCDF-safe: a JSON string
    out["devices_attr"] = json.loads(devices) if isinstance(devices, str) else list(devices)
    out["posterior_shape"] = list(idata.posterior["beta"].shape)

    def refusal(**settings):  # the ValueError's message, or None
        try:
            emdppl.SVI(**settings)
        except ValueError as err:
            return str(err)

    out["errors"] = [refusal(num_particles=6, devices=4),
                     refusal(num_particles=4, num_samples=1002, num_chains=1, devices=4)]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result(on_devices):
    """The script's measurements, from a subprocess with 4 CPU devices."""
    measured = on_devices(SCRIPT)
    assert measured["num_devices"] == 4
    return measured


def test_state_is_replicated_and_posterior_draws_are_split(result):
    assert result["state_replicated"] and result["state_devices"] == 4
    assert result["draws_spec"] and result["draw_rows"] == [100]  # 400 draws / 4 devices
    assert result["devices_attr"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert result["posterior_shape"] == [4, 250, 2]


def test_the_gradient_is_all_reduced_and_the_fit_is_that_of_one_device(result):
    """Same keys: the particles and the optimiser steps are those of the one-device run, up to
    the float32 summation order of the particle mean."""
    assert "all-reduce" in result["collectives"]
    assert result["param_max_diff"] <= 1e-5
    assert result["draws_max_diff"] <= 1e-5
    one, many = (np.asarray(result["losses"][k]) for k in ("None", "4"))
    np.testing.assert_allclose(many, one, rtol=1e-5)


def test_uneven_particles_or_draws_are_refused_early(result):
    particles, draws = result["errors"]
    assert particles is not None and "num_particles=6 is not a multiple of the 4" in particles
    assert draws is not None and "num_samples=1002 is not a multiple of the 4" in draws


def test_devices_need_a_numpyro_elbo():
    with pytest.raises(TypeError, match="vectorize_particles_fn"):
        emdppl.SVI(loss=object(), devices=1)
    with pytest.raises(ValueError, match="devices must be None, .all., an int"):
        emdppl.SVI(devices="gpu0")
