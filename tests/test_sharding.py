"""Chains over 4 fake CPU devices (``--xla_force_host_platform_device_count=4``), in a fresh
subprocess (the device count is fixed when JAX starts): placement, per-device shapes, no
collectives in the compiled sampling step, and the same draws as on one device."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import emdppl

SCRIPT = textwrap.dedent(
    """
    import json, re, warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # short fixed-step chains: R-hat warnings
    import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    import emdppl
    from emdppl import driver, mcmc as mcmc_module, sharding

    out = {"num_devices": len(jax.devices())}

    def logdensity(x):
        return -0.5 * jnp.sum((x - jnp.arange(3.0)) ** 2 / jnp.array([1.0, 4.0, 0.25]))

    target = emdppl.Target.from_logdensity(logdensity, jnp.zeros(3), num_chains=8)
    # fixed kernel parameters (no warm-up): sharded and unsharded chains take the same steps
    fixed = {d: emdppl.MCMC("mala", num_warmup=0, num_samples=300, num_chains=8, devices=d,
                            step_size=0.4).sample(1, target, progress_bar=False)
             for d in (None, 4)}
    out["fixed_max_diff"] = float(np.max(np.abs(fixed[4].positions - fixed[None].positions)))
    leaf = jax.tree.leaves(fixed[4].state.chain_state)[0]
    out["chain_spec"] = leaf.sharding.spec == jax.sharding.PartitionSpec("chain")
    out["state_devices"] = len(leaf.sharding.device_set)
    out["shard_rows"] = sorted({s.data.shape[0] for s in leaf.addressable_shards})

    # the compiled chunk of sampling steps on the sharded state: no cross-device communication
    mesh = sharding.chain_mesh(4, 8)
    algorithm = mcmc_module.mcmc_algorithm("mala", logdensity, step_size=0.4)
    state = algorithm.init(sharding.shard_chains(target.initial_position, mesh), jax.random.key(0))
    hlo = driver._chunk.lower(algorithm, state, jax.random.key(1), jnp.asarray(0), 10, 1)
    text = hlo.compile().compiled.as_text()
    out["collectives"] = sorted(set(re.findall(
        r"all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter", text)))

    # NUTS with adaptation on a NumPyro regression, through infer: draws, groups, attrs
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)); y = X @ np.array([1.0, -2.0]) + rng.normal(size=50)
    def model(X, y):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)
    runs = {}
    for d in (None, "all"):
        idata = emdppl.infer(model, emdppl.MCMC("nuts", num_warmup=300, num_samples=500,
                             num_chains=4, devices=d), model_kwargs=dict(X=X, y=y), rng_key=3,
                             progress_bar=False)
        runs[str(d)] = idata
    out["nuts_draws"] = {k: v.posterior["beta"].values.tolist() for k, v in runs.items()}
    devices = runs["all"].posterior.attrs["devices"]  # netCDF-safe: a JSON string
    out["devices_attr"] = json.loads(devices) if isinstance(devices, str) else list(devices)
    out["loglik_shape"] = list(runs["all"].log_likelihood["y"].shape)
    for bad in (dict(num_chains=6, devices=4), dict(num_chains=4, devices=9)):
        try:
            emdppl.MCMC("nuts", **bad)
            out.setdefault("errors", []).append(None)
        except ValueError as err:
            out.setdefault("errors", []).append(str(err))
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result(on_devices):
    return on_devices(SCRIPT)


def test_chains_are_split_over_the_chain_axis(result):
    assert result["num_devices"] == 4
    assert result["chain_spec"]
    assert result["state_devices"] == 4
    assert result["shard_rows"] == [2]  # 8 chains / 4 devices


def test_sharded_sampling_has_no_collectives_and_the_same_draws(result):
    assert result["collectives"] == []
    # same keys, same kernel: only float reassociation can differ
    assert result["fixed_max_diff"] <= 1e-5


def test_adapted_nuts_on_devices_agrees_with_one_device(result):
    """The sharded and unsharded runs use the same keys, so their draws agree to round-off;
    the check is the weaker |z| < 4 on the posterior means (MCSE from ESS), p = 6.3e-5 each."""
    one, many = (np.asarray(result["nuts_draws"][k]) for k in ("None", "all"))
    assert one.shape == many.shape == (4, 500, 2)
    import arviz as az

    for i in range(2):
        mcse = float(az.mcse(one[..., i]))
        assert abs(many[..., i].mean() - one[..., i].mean()) < 4 * np.sqrt(2) * mcse
    devices = result["devices_attr"]
    assert len(devices) == 4 and all("cpu" in d.lower() for d in devices)
    assert result["loglik_shape"] == [4, 500, 50]


def test_uneven_chains_and_missing_devices_are_refused_early(result):
    uneven, missing = result["errors"]
    assert uneven is not None and "num_chains=6 is not a multiple of the 4 devices" in uneven
    assert missing is not None and "between 1 and the 4 device(s)" in missing


def test_devices_none_keeps_one_device_and_bad_specs_fail_before_tracing():
    with pytest.raises(ValueError, match="devices must be None, .all., an int"):
        emdppl.MCMC("nuts", devices="gpu0")
    assert emdppl.sharding.chain_mesh(None, 4) is None
