"""EMD on generated mixtures: the problem generator, the residual estimator, the E-step's z step.

Problems come from ``benchmarks.problems.random_mixture`` at ``TEST_SEEDS`` only (the benchmark
tunes and checks on other seeds).
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emdppl
from emdppl import emd, generators
from emdppl import estep as estep_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.problems import TEST_SEEDS, mode_metrics, random_mixture  # noqa: E402


@pytest.mark.parametrize("seed", TEST_SEEDS)
def test_random_mixture_meets_its_specification(seed):
    problem = random_mixture(seed)
    k, d = problem.locs.shape
    assert 4 <= k <= 25 and 2 <= d <= 10
    assert problem.weights.min() >= 0.02 - 1e-12 and abs(problem.weights.sum() - 1) < 1e-12
    assert np.all(problem.scales.max(1) / problem.scales.min(1) > 1)  # anisotropic
    reach = problem.scales.max(1)
    gaps = np.linalg.norm(problem.locs[:, None] - problem.locs[None], axis=-1)
    needed = 6 * np.maximum(reach[:, None], reach[None])
    assert np.all((gaps >= needed) | np.eye(k, dtype=bool))
    # Exact draws: off-mode ~ Binomial(n, 0.001), and the TV of n multinomial draws has mean
    # <= 0.5 sum_k sqrt(w_k / n) <= 0.5 sqrt(K / n) (Cauchy-Schwarz) = 0.018 at K = 25; 3x is
    # beyond any Markov-bound p-value of 0.34, and the assignment error at 6 scales is < 1e-6.
    n = 20_000
    metrics = mode_metrics(np.asarray(problem.teacher().sample(jax.random.key(seed), n)), problem)
    assert metrics["tv"] < 1.5 * np.sqrt(k / n), metrics["tv"]
    assert abs(metrics["off_mode"] - 0.001) < 4 * np.sqrt(0.001 / n)  # z-test, p = 6e-5


def _small(seed):
    return random_mixture(seed, modes_range=(4, 14), dim_range=(2, 3))


def _affine_cover(problem, rng_key):
    """The Gaussian fitted to the mixture: an exact student (its own marginal score)."""
    x = np.asarray(problem.teacher().sample(rng_key, 20_000))
    return generators.affine(problem.data_dim, loc=x.mean(0), scale=np.linalg.cholesky(np.cov(x.T)))


def _run_estep(problem, generator, rng_key, sigma, n, **options):
    teacher = problem.teacher()
    config = emdppl.DistillConfig(batch_size=n, **options).for_teacher(teacher)
    kernel = emd.build_kernel(config, generator, None)
    state = emd.init(generator, None, config)
    target = kernel.estep_target(teacher, state.theta, state.psi)
    k_eps, k_z, k_chain = jax.random.split(rng_key, 3)
    eps0 = jax.random.normal(k_eps, (n, problem.data_dim))
    z0 = jax.random.normal(k_z, (n, generator.latent_dim))
    sigma = jnp.full(n, sigma)
    result = jax.jit(
        lambda key: estep_module.estep(
            key, config, target, sigma, eps0, z0, kernel.sampler_parameters
        )
    )(k_chain)
    return result, kernel


def test_residual_at_zero_steps_is_diff_instruct_exactly():
    """docs/EMD.md §4.3: at K = 0, sigma Delta(x^0) is Diff-Instruct's residual over the step."""
    problem = _small(TEST_SEEDS[0])
    generator = _affine_cover(problem, jax.random.key(0))
    key, sigma, n = jax.random.key(1), 0.7, 64
    residual, kernel = _run_estep(problem, generator, key, sigma, n, num_estep_steps=0,
                                  noise_cancellation="residual", estep_grad_clip=None)
    di, di_kernel = _run_estep(problem, generator, key, sigma, n, method="diff_instruct",
                               estep_grad_clip=None)
    step = float(di_kernel.sampler_parameters["step_size"])
    np.testing.assert_allclose(residual.z, residual.z0)  # K = 0: z is the generator's draw
    np.testing.assert_allclose(di.z, residual.z)
    np.testing.assert_allclose(residual.eps_tilde * step, di.eps_tilde, rtol=1e-4, atol=1e-6)
    assert float(jnp.std(residual.eps_tilde)) > 0.1  # a non-trivial residual was compared


@pytest.mark.parametrize("seed", TEST_SEEDS)
def test_estep_with_exact_student_moves_the_noisy_marginal_toward_the_teacher(seed):
    """z sampled, exact student (an affine generator): the chains' x^K = g(z^K) + sigma eps^K
    target p_sigma, so the TV of its mode masses to the teacher's falls as K grows.

    With n = 4000 chains the TV estimate's noise is at most 0.5 sqrt(K_modes / n) <= 0.03
    (Cauchy-Schwarz on the multinomial); each required drop (10%, 30%) is several times that."""
    problem = _small(seed)
    generator = _affine_cover(problem, jax.random.key(seed))
    sigma, n = 0.3 * problem.teacher().sigma_data, 4000
    noisy = np.asarray(problem.teacher().sample(jax.random.key(seed + 1), 50_000))
    noisy = noisy + sigma * np.random.default_rng(seed).normal(size=noisy.shape)
    reference = mode_metrics(noisy, problem, sigma)["masses"]
    tv = []
    for k in (0, 16, 64):
        result, _ = _run_estep(problem, generator, jax.random.key(seed), sigma, n,
                               num_estep_steps=k, z_step_rule="jacobian")
        x = jax.vmap(generator)(result.z) + sigma * result.eps
        tv.append(mode_metrics(np.asarray(x), problem, sigma, target=reference)["tv"])
    assert tv[0] > 0.15, tv  # the Gaussian is far from the mixture's mode masses
    assert tv[1] < 0.9 * tv[0] and tv[2] < 0.7 * tv[0] and tv[2] < tv[1], tv


def test_from_teacher_with_a_wider_latent_starts_as_the_square_one():
    problem = _small(TEST_SEEDS[1])
    teacher = problem.teacher()
    square = generators.from_teacher(teacher, key=jax.random.key(0))
    wide = generators.from_teacher(teacher, key=jax.random.key(0), latent_dim=8)
    z = jax.random.normal(jax.random.key(1), (16, 8))
    assert wide.latent_dim == 8 and wide.data_dim == problem.data_dim
    np.testing.assert_allclose(jax.vmap(wide)(z), jax.vmap(square)(z[:, : problem.data_dim]))
    with pytest.raises(ValueError, match="latent_dim must be >="):
        generators.from_teacher(teacher, key=jax.random.key(0), latent_dim=1)


def test_jacobian_z_step_rule_divides_the_step_by_one_plus_the_jacobian_norm():
    config = emdppl.DistillConfig(z_step_rule="jacobian", z_step_scale=0.2, max_z_step=0.5)
    scale = jnp.array([[3.0, 0.0], [1.0, 2.0]])
    step = estep_module.z_step(config, lambda z: scale @ z, jnp.asarray(1.0), jnp.ones(2))
    assert float(step) == pytest.approx(0.2 / (1 + 14.0), rel=1e-6)
    with pytest.raises(ValueError, match="z_step_rule"):
        emdppl.DistillConfig(z_step_rule="other")
