"""EM distillation over 4 fake CPU devices (``--xla_force_host_platform_device_count=4``), in a
fresh subprocess (the device count is fixed when JAX starts): the batch split over a
``"batch"`` mesh axis, parameters replicated, gradients all-reduced, and the same parameters
as on one device."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import emdppl

PRELUDE = textwrap.dedent(
    """
    import json, re, warnings
    warnings.simplefilter("ignore", RuntimeWarning)
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
    import emdppl
    from emdppl import driver, emd, generators, teachers

    out = {"num_devices": len(jax.devices())}

    def collectives(text):
        return sorted(set(re.findall(
            r"all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter", text)))

    def compiled_chunk(algorithm, state, num_steps):  # the program emdppl.run compiled
        lowered = driver._chunk.lower(algorithm, state, jax.random.key(0), jnp.asarray(0),
                                      num_steps, 1)
        return lowered.compile().compiled.as_text()

    def leading_sizes(text):  # leading sizes of the arrays of a compiled (partitioned) program
        return sorted({int(n) for n in re.findall(r"[fsu]32\\[(\\d+),", text)})
    """
)

MIXTURE = PRELUDE + textwrap.dedent(
    """
    teacher = teachers.GaussianMixture(jnp.array([[-1.0, 0.5], [1.5, -0.5]]),
                                       jnp.array([0.5, 0.7]), jnp.array([0.4, 0.6]))

    def max_diff(a, b):
        return max(float(jnp.max(jnp.abs(x - y))) for x, y in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def all_replicated(tree):
        return all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == 4
                   for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
    """
)

GENERATOR = MIXTURE + textwrap.dedent(
    """
    # EMD of an affine generator (its own student), 20 steps on one and on four devices
    generator = generators.affine(2, loc=jnp.array([0.3, -0.2]), scale=0.5)
    options = dict(batch_size=64, num_steps=20, num_estep_steps=2, num_probe_draws=0,
                   optimizer=optax.adam(1e-2), progress_bar=False)
    runs = {d: emdppl.distill(teacher, generator, rng_key=3, devices=d, **options)
            for d in (None, 4)}
    out["theta_diff"] = max_diff(runs[None].state.theta, runs[4].state.theta)
    out["theta_moved"] = max_diff(runs[None].state.theta, generators.partition(generator)[0])
    out["devices"] = [list(runs[d].devices) for d in (None, 4)]
    out["state_replicated"] = all_replicated(runs[4].state)

    # the E-step batch drawn inside the step: split over the "batch" axis
    algorithm = emd.as_top_level_api(teacher, generator, config=runs[4].config, devices=4)
    batch = eqx.filter_jit(lambda k, key: k.draw_batch(key))(
        algorithm.step.kernel, jax.random.key(2))
    out["batch_split"] = [x.sharding.spec == jax.sharding.PartitionSpec("batch") for x in batch]
    out["batch_shards"] = [sorted({s.data.shape for s in x.addressable_shards}) for x in batch]

    # the compiled chunk of EMD steps distill ran: 64 / 4 = 16 rows a device, the generator's
    # gradients all-reduced
    state = algorithm.init(generator, jax.random.key(0))
    text = compiled_chunk(algorithm, state, 20)
    out["emd_collectives"] = collectives(text)
    out["emd_sizes"] = leading_sizes(text)
    print("RESULT" + json.dumps(out))
    """
)

STUDENT = MIXTURE + textwrap.dedent(
    """
    # a learned student: 10 DSM steps (its batch split too) on one and on four devices
    generator = generators.mlp(2, key=jax.random.key(0), width=8, depth=1)
    network = teachers.EDMNetwork(2, key=jax.random.key(1), width=8, depth=1)
    student = teachers.DiffusionModel(network, 1.0, 2)
    config = emdppl.DistillConfig(batch_size=64, optimizer=optax.adam(1e-2)).for_teacher(teacher)
    psi = {}
    for d in (None, 4):
        algorithm = emd.as_top_level_api(teacher, generator, student, config, devices=d)
        kernel = emd.build_student_kernel(config, generator, student, algorithm.init.mesh)
        warmup = emdppl.base.Algorithm(algorithm.init, kernel)
        state, _ = emdppl.run(5, warmup, 10, algorithm.init(generator), progress_bar=False)
        psi[d] = state.psi
    out["psi_diff"] = max_diff(psi[None], psi[4])
    out["psi_moved"] = max_diff(psi[None], emd.init(generator, student, config).psi)
    out["psi_replicated"] = all_replicated(psi[4])
    text = compiled_chunk(warmup, state, 10)
    out["dsm_collectives"] = collectives(text)
    out["dsm_sizes"] = leading_sizes(text)
    print("RESULT" + json.dumps(out))
    """
)

POSTERIOR = PRELUDE + textwrap.dedent(
    """
    import numpyro, numpyro.distributions as dist
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2)); y = X @ np.array([1.0, -2.0]) + rng.normal(size=50)
    def model(X, y):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
        numpyro.sample("y", dist.Normal(X @ beta, 1.0), obs=y)
    method = emdppl.EMD(devices=4, generator="affine", num_steps=40, batch_size=32,
                        num_samples=40, num_chains=4, num_probe_draws=0)
    idata = emdppl.infer(model, method, model_kwargs=dict(X=X, y=y), rng_key=0,
                         progress_bar=False)
    devices = idata.posterior.attrs["devices"]  # netCDF-safe: a JSON string
    out["devices_attr"] = json.loads(devices) if isinstance(devices, str) else list(devices)
    out["beta_shape"] = list(idata.posterior["beta"].shape)
    out["beta_mean"] = idata.posterior["beta"].values.reshape(-1, 2).mean(0).tolist()
    out["ols"] = np.linalg.lstsq(X, y, rcond=None)[0].tolist()

    teacher = teachers.GaussianMixture(jnp.array([[1.5]]), jnp.array([0.7]), jnp.array([1.0]))
    generator = generators.affine(1)
    errors = []
    for make in (
        lambda: emdppl.distill(teacher, generator, batch_size=30, devices=4),
        lambda: emdppl.EMD(devices=4, batch_size=30),
        lambda: emdppl.EMD(devices=9),
    ):
        try:
            make()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    out["errors"] = errors
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def generator_run(on_devices):
    return on_devices(GENERATOR)


@pytest.fixture(scope="module")
def student_run(on_devices):
    return on_devices(STUDENT)


@pytest.fixture(scope="module")
def posterior(on_devices):
    return on_devices(POSTERIOR)


def test_distill_on_four_devices_matches_one_device(generator_run):
    """Same seed, same keys (partitionable threefry): only the float reassociation of the
    batch sums differs, so 20 EMD steps leave the parameters within 1e-5; they move by far
    more than that."""
    assert generator_run["num_devices"] == 4
    assert generator_run["theta_moved"] > 1e-3 and generator_run["theta_diff"] <= 1e-5
    one, four = generator_run["devices"]
    assert one == ["cpu:0"] and four == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def test_student_on_four_devices_matches_one_device(student_run):
    """As above for 10 DSM steps of a learned student (an EDM network)."""
    assert student_run["psi_moved"] > 1e-3 and student_run["psi_diff"] <= 1e-5


def test_batch_is_split_and_parameters_replicated(generator_run, student_run):
    assert generator_run["state_replicated"] and student_run["psi_replicated"]
    assert generator_run["batch_split"] == [True] * 3
    assert generator_run["batch_shards"] == [[[16]], [[16, 2]], [[16, 2]]]  # sigma, eps0, z0


def test_compiled_steps_all_reduce_a_split_batch(generator_run, student_run):
    """No array of the whole batch (64) on a device, only its quarter (16); the only
    collective is the all-reduce of the batch sums (gradients, losses)."""
    for run, name in ((generator_run, "emd"), (student_run, "dsm")):
        assert run[f"{name}_collectives"] == ["all-reduce"]
        assert 64 not in run[f"{name}_sizes"] and 16 in run[f"{name}_sizes"]


def test_posterior_emd_on_four_devices(posterior):
    """A 40-step run records its devices and keeps MCMC's layout; its means are checked only
    loosely (0.5 from least squares, where the posterior sd is about 0.15): the budget is too
    small for more, and accuracy is test_emd's business."""
    assert posterior["devices_attr"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert posterior["beta_shape"] == [4, 10, 2]
    assert np.max(np.abs(np.subtract(posterior["beta_mean"], posterior["ols"]))) < 0.5


def test_uneven_batch_and_missing_devices_are_refused_early(posterior):
    uneven_distill, uneven_emd, missing = posterior["errors"]
    for message in (uneven_distill, uneven_emd):
        assert message is not None and "batch_size=30 is not a multiple of the 4 devices" in message
        assert "Use batch_size=32" in message
    assert missing is not None and "between 1 and the 4 device(s)" in missing


def test_bad_device_specs_fail_before_tracing():
    with pytest.raises(ValueError, match="devices must be None, .all., an int"):
        emdppl.EMD(devices="gpu0")
    assert emdppl.sharding.batch_mesh(None, 7) is None
