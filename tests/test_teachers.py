"""Teachers: exact Gaussian-mixture scores and draws, DSM-trained teacher, density teacher."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emdppl
from emdppl import generators, schedule, teachers


def _mixture() -> teachers.GaussianMixture:
    locs = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    scales = jnp.array([[0.3, 0.5], [0.4, 0.4], [0.2, 0.6]])
    return teachers.GaussianMixture(locs, scales, jnp.array([0.2, 0.5, 0.3]))


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.3, 1.0, 5.0, 80.0])
def test_mixture_score_is_gradient_of_log_prob(sigma):
    teacher = _mixture()
    x = jax.random.normal(jax.random.key(0), (16, 2)) * 3
    exact = jax.vmap(jax.grad(teacher.log_prob), in_axes=(0, None))(x, sigma)
    score = jax.vmap(teacher.score, in_axes=(0, None))(x, jnp.asarray(sigma))
    np.testing.assert_allclose(score, exact, rtol=1e-4, atol=1e-5)
    if sigma > 0:
        denoised = jax.vmap(teacher.denoise, in_axes=(0, None))(x, sigma)
        np.testing.assert_allclose(denoised, x + sigma**2 * exact, rtol=1e-4, atol=1e-4)


def test_mixture_log_prob_normalised():
    teacher = _mixture()
    grid = jnp.linspace(-8, 8, 401)
    xx, yy = jnp.meshgrid(grid, grid)
    points = jnp.stack([xx.ravel(), yy.ravel()], -1)
    density = jnp.exp(jax.vmap(teacher.log_prob, in_axes=(0, None))(points, 0.5))
    assert float(density.sum() * (grid[1] - grid[0]) ** 2) == pytest.approx(1.0, abs=1e-3)


def test_mixture_exact_samples_moments():
    teacher = _mixture()
    n = 200_000
    x = np.asarray(teacher.sample(jax.random.key(1), n))
    w, mu, s = np.asarray(teacher.weights), np.asarray(teacher.locs), np.asarray(teacher.scales)
    mean = w @ mu
    var = w @ (s**2 + mu**2) - mean**2
    mcse = np.sqrt(var / n)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * mcse)  # 4 MCSE: two-sided p ~ 6e-5 per coordinate
    fourth = w @ (3 * s**4 + 6 * s**2 * (mu - mean) ** 2 + (mu - mean) ** 4)  # E[(x-m)^4]
    var_mcse = np.sqrt((fourth - var**2) / n)
    assert np.all(np.abs(x.var(0) - var) < 4 * var_mcse)


def test_mixture_validation_messages():
    with pytest.raises(ValueError, match="scales must have shape"):
        teachers.GaussianMixture(jnp.zeros((3, 2)), jnp.ones(2), jnp.ones(3))
    with pytest.raises(ValueError, match="positive"):
        teachers.GaussianMixture(jnp.zeros((3, 2)), jnp.ones(3), jnp.array([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("solver, num_steps", [("heun", 50), ("ddim", 400)])
def test_ode_sampler_on_exact_score_matches_mixture(solver, num_steps):
    teacher = _mixture()
    n = 20_000
    x = teacher.sample_ode(jax.random.key(2), n, num_steps=num_steps, solver=solver)
    ref = teacher.sample(jax.random.key(3), n)
    sd = np.asarray(ref.std(0))
    # Within 4 MCSE of the difference of two means, plus the bias of starting from N(0, 80^2)
    # instead of p_80 (the data mean shrunk by sd / sigma_max: at most |mean| * sd / 80).
    prior_bias = np.abs(np.asarray(ref.mean(0))) * sd / 80
    mean_error = np.abs(np.asarray(x.mean(0) - ref.mean(0)))
    assert np.all(mean_error < 4 * sd * np.sqrt(2 / n) + prior_bias)
    # std: 4 MCSE of a ratio of two sds (~sqrt(1/n) each for near-normal) plus 1% discretisation
    assert np.all(np.abs(np.asarray(x.std(0) / ref.std(0)) - 1) < 4 * np.sqrt(1 / n) + 0.01)


def test_one_step_ddim_is_the_denoiser_at_sigma_max():
    teacher = _mixture()
    x = teacher.sample_ode(jax.random.key(4), 5, num_steps=1, solver="ddim")
    x0 = schedule.SIGMA_MAX * jax.random.normal(jax.random.key(4), (5, 2))
    expected = jax.vmap(teacher.denoise, in_axes=(0, None))(x0, schedule.SIGMA_MAX)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    assert [schedule.num_function_evaluations(k, "ddim") for k in (1, 2, 4, 18)] == [1, 2, 4, 18]
    assert schedule.num_function_evaluations(18, "heun") == 35
    with pytest.raises(ValueError, match="solver"):
        teacher.sample_ode(jax.random.key(4), 5, num_steps=2, solver="euler")


def test_karras_grid():
    sigmas = schedule.karras_sigmas(18)
    assert sigmas.shape == (19,) and float(sigmas[0]) == pytest.approx(80.0)
    assert float(sigmas[-2]) == pytest.approx(0.002, rel=1e-4) and float(sigmas[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(sigmas) < 0))


def test_train_diffusion_learns_a_gaussian():
    data = 1.5 + 0.5 * jax.random.normal(jax.random.key(4), (4000, 1))
    teacher = teachers.train_diffusion(data, rng_key=0, num_steps=1500, progress_bar=False)
    x = teacher.sample(jax.random.key(5), 4000, num_steps=18)
    assert abs(float(x.mean()) - 1.5) < 0.1
    assert abs(float(x.std()) - 0.5) < 0.1


def test_user_network_in_two_lines():
    net = lambda x_in, c_noise: jnp.zeros_like(x_in)  # noqa: E731 - the wrapped "network"
    teacher = teachers.DiffusionModel(net, sigma_data=0.5, data_dim=2)
    # D = c_skip x: the exact denoiser of N(0, sigma_data^2), so the score is -x / (s^2 + sigma^2).
    x = jnp.array([1.0, -2.0])
    np.testing.assert_allclose(teacher.score(x, 0.3), -x / (0.25 + 0.09), rtol=1e-5)


def test_from_model_scores_the_posterior():
    import numpyro
    import numpyro.distributions as dist

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    data = {"y": jnp.array([1.0, 2.0])}
    teacher = teachers.from_model(model, model_kwargs=data)
    assert teacher.data_dim == 1
    # posterior of mu_decentered (mu = 2 v): precision 1 + 4 * 2 = 9, mean 2 * 3 / 9. The
    # teacher's coordinate u is standardised by the Laplace approximation, exact here:
    # v = 2/3 + u / 3, u ~ N(0, 1), and the Laplace-smoothed score is exact: -u / (1 + sigma^2).
    u = jnp.array([0.3])
    np.testing.assert_allclose(teacher.position(u)["mu_decentered"], 2 / 3 + 0.1, rtol=1e-4)
    for sigma in (0.01, 0.3):
        np.testing.assert_allclose(teacher.score(u, sigma), -u / (1 + sigma**2), rtol=1e-3)
    assert teacher.sigma_max == pytest.approx(0.5)
    # unstandardised, the coordinate is v itself: score -(v - 2/3) / (1/9 + sigma^2)
    target = emdppl.Problem.of(model, model_kwargs=data).target(1, jax.random.key(0))
    raw = teachers.density_teacher(target, standardize=False)
    for sigma in (0.01, 0.3):
        expected = -(u - 2 / 3) / (1 / 9 + sigma**2)
        np.testing.assert_allclose(raw.score(u, sigma), expected, rtol=1e-3)


def test_laplace_standardization_of_a_log_density_jax_differentiates_once():
    """A log density on the host (numpy behind a custom-VJP callback, as torch and Pyro models
    are) has no JAX Hessian: the Laplace fit falls back to differences of its gradient and
    still recovers the Gaussian's mean and covariance (to the differences' O(h^2) = 0 here)."""
    mean = np.array([1.0, -2.0, 0.5])
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]])
    precision = np.linalg.inv(cov)

    def host(x):
        r = np.asarray(x, np.float64) - mean
        return np.float32(-0.5 * r @ precision @ r), (-(precision @ r)).astype(np.float32)

    @jax.custom_vjp
    def logdensity(x):
        return jax.pure_callback(lambda x: host(x)[0], jax.ShapeDtypeStruct((), x.dtype), x)

    def fwd(x):
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.pure_callback(host, shapes, x, vmap_method="sequential")

    logdensity.defvjp(fwd, lambda grad, cotangent: (cotangent * grad,))
    with pytest.raises(ValueError, match="JVP"):
        jax.hessian(logdensity)(jnp.zeros(3))
    shift, scale_tril = teachers.laplace_standardization(logdensity, lambda x: x, jnp.zeros(3))
    np.testing.assert_allclose(shift, mean, atol=1e-3)
    np.testing.assert_allclose(scale_tril @ scale_tril.T, cov, atol=2e-3)


def test_laplace_standardization_keeps_the_highest_of_several_starts():
    """Two separated modes, 0.3 N(-3, 0.5^2) + 0.7 N(3, 0.5^2): a start at -3 ends at the lower
    mode, so whatever the order of the starts the fit is the higher one's (mean 3, sd 0.5);
    a start whose density is not finite is passed over."""
    mixture = jnp.log(jnp.array([0.3, 0.7]))

    def logdensity(x):
        return jax.nn.logsumexp(mixture - 0.5 * ((x[0] - jnp.array([-3.0, 3.0])) / 0.5) ** 2)

    alone = teachers.laplace_standardization(logdensity, lambda x: x, jnp.array([-3.2]))
    np.testing.assert_allclose(alone[0], [-3.0], atol=1e-3)
    for starts in ([[-3.2], [2.5]], [[2.5], [-3.2]], [[jnp.inf], [-3.2], [2.5]]):
        shift, scale_tril = teachers.laplace_standardization(
            logdensity, lambda x: x, jnp.array(starts)
        )
        np.testing.assert_allclose(shift, [3.0], atol=1e-3)
        np.testing.assert_allclose(scale_tril, [[0.5]], rtol=1e-3)


def test_generators_shapes_and_numpyro_model():
    key = jax.random.key(0)
    generator = generators.mlp(2, 3, key=key)
    z = jax.random.normal(key, (5, 3))
    assert jax.vmap(generator)(z).shape == (5, 2)
    theta, static = generators.partition(generator)
    np.testing.assert_allclose(generators.apply(theta, static, z[0]), generator(z[0]))
    affine = generators.affine(2, loc=jnp.array([1.0, 0.0]), scale=2.0)
    x = jnp.array([0.5, 0.5])
    expected = jax.scipy.stats.multivariate_normal.logpdf(x, affine.loc, (4 + 0.09) * jnp.eye(2))
    np.testing.assert_allclose(affine.marginal_logdensity(x, 0.3), expected, rtol=1e-5)
    import numpyro

    model = generators.numpyro_model(generator, sigma=0.1)
    draws = numpyro.infer.Predictive(model, num_samples=1)(key, num_samples=7)
    assert draws["x"].shape == (1, 7, 2)
    copy = generators.from_teacher(_mixture(), key=key)
    # the residual starts at zero: the generator is the teacher's denoiser at sigma_init
    np.testing.assert_allclose(
        copy(z[0, :2]), _mixture().denoise(copy.input_scale * z[0, :2], copy.sigma_init), rtol=1e-5
    )


def test_sinh_arcsinh_generator_density_and_smoothed_score():
    generator = generators.sinh_arcsinh(1)
    generator = eqx.tree_at(
        lambda g: (g.skew, g.log_tail, g.log_diag),
        generator,
        (jnp.array([0.7]), jnp.array([-0.3]), jnp.array([0.4])),
    )
    grid = jnp.linspace(-30, 30, 60_001)[:, None]
    density = jnp.exp(jax.vmap(generator.log_prob)(grid))
    assert float(density.sum() * (grid[1, 0] - grid[0, 0])) == pytest.approx(1.0, abs=1e-3)
    draws = jax.vmap(generator)(jax.random.normal(jax.random.key(0), (200_000, 1)))
    mean = float((grid[:, 0] * density).sum() * (grid[1, 0] - grid[0, 0]))
    assert abs(float(draws.mean()) - mean) < 4 * float(draws.std()) / np.sqrt(200_000)
    # Laplace-smoothed score: exact for a Gaussian (affine generator), -> grad log q as sigma -> 0
    affine = generators.affine(2, loc=jnp.array([1.0, -1.0]), scale=0.7)
    x = jnp.array([0.3, 0.4])
    np.testing.assert_allclose(
        teachers.laplace_smoothed_score(
            jax.grad(lambda v: affine.marginal_logdensity(v, 0.0)), x, 0.4, 30
        ),
        affine.marginal_score(x, 0.4),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        generator.marginal_score(jnp.array([0.5]), 1e-3),
        jax.grad(generator.log_prob)(jnp.array([0.5])),
        rtol=1e-3,
    )


def test_maf_generator_is_triangular_with_exact_density():
    """MAF generator: identity MADE at init, then log_prob == change of variables of g."""
    generator = generators.maf(3, key=jax.random.key(0), width=8)
    z = jax.random.normal(jax.random.key(1), (3,))
    np.testing.assert_allclose(generator(z), generator.base(z), rtol=1e-6)
    generator = eqx.tree_at(
        lambda g: (g.w_out, g.b_out),
        generator,
        (0.3 * jax.random.normal(jax.random.key(2), (6, 8)), jnp.full(6, 0.1)),
    )
    x = generator(z)
    jac = jax.jacfwd(generator)(z)
    np.testing.assert_array_equal(jnp.triu(jac, 1), 0.0)  # x_j depends on z_{<=j} only
    expected = jax.scipy.stats.norm.logpdf(z).sum() - jnp.linalg.slogdet(jac)[1]
    np.testing.assert_allclose(generator.log_prob(x), expected, rtol=1e-4)
    theta, static = generators.partition(generator)
    assert not any(leaf.dtype == jnp.int32 for leaf in jax.tree.leaves(theta))  # masks are fixed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sinh_arcsinh_generator_fast_forms_match_jax(dtype):
    """The generator's log/exp forms of asinh and sinh equal jnp's, values and derivatives
    (z = 0 included: the select keeps d asinh/dz = 1 there), to tens of ulps of each dtype."""
    with jax.enable_x64(dtype == "float64"):
        z = jnp.concatenate([jnp.zeros(1), jnp.linspace(-40, 40, 4001)]).astype(dtype)
        eps = float(jnp.finfo(z.dtype).eps)
        np.testing.assert_allclose(generators._arcsinh(z), jnp.arcsinh(z), atol=4 * eps, rtol=0)
        np.testing.assert_allclose(
            jax.vmap(jax.grad(generators._arcsinh))(z), 1 / jnp.sqrt(1 + z**2), rtol=8 * eps
        )
        u = jnp.linspace(-20, 20, 4001).astype(dtype)
        np.testing.assert_allclose(generators._sinh(u), jnp.sinh(u), rtol=32 * eps, atol=4 * eps)
        generator = eqx.tree_at(
            lambda g: (g.skew, g.log_tail, g.log_diag),
            generators.sinh_arcsinh(3),
            (jnp.array([0.7, -0.2, 0.0]), jnp.array([-0.3, 0.2, 0.0]), jnp.array([0.4, 0, 0])),
        )
        generator = jax.tree.map(lambda a: a.astype(dtype), generator)
        latents = jax.random.normal(jax.random.key(0), (64, 3), dtype)
        reference = jax.vmap(lambda v: generator.loc + generator._scale() @ jnp.sinh(
            (jnp.arcsinh(v) + generator.skew) * jnp.exp(-generator.log_tail)))(latents)
        np.testing.assert_allclose(jax.vmap(generator)(latents), reference, rtol=1e3 * eps,
                                   atol=1e2 * eps)
