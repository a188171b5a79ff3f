"""Torch functions lowered to JAX (emdppl.bridge.aten): log densities built from
torch.distributions give torch's value and gradient (float32, and float64 under x64), in-place
ops and data constants included; float64 without x64 computes in float32 (checked at float32
rounding); an op without a translation and a function that cannot be recorded are
LoweringErrors that say why."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import distributions as td  # noqa: E402

from emdppl.bridge.aten import LoweringError, agrees_with_torch, lower_to_jax  # noqa: E402

DIM = 9
COUNTS = torch.tensor([3.0, 0.0, 7.0, 1.0])
LABELS = torch.tensor([2, 0, 1, 1])


def logdensity(x):
    """A potential over many torch.distributions (lgamma, digamma, xlogy, softplus, Cholesky,
    triangular solves, log_softmax + gather, logsumexp, clamp, where, in-place masked_fill) and
    overloads told apart by name (max, max.dim, maximum; std)."""
    dtype = x.dtype
    loc, log_scale, raw = x[:2], x[2], x[3:]
    scale = torch.nn.functional.softplus(log_scale) + 0.1
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=dtype) * scale
    out = td.MultivariateNormal(torch.zeros(2, dtype=dtype), covariance_matrix=cov).log_prob(loc)
    rate = raw[:4].exp()
    out = out + td.Poisson(rate).log_prob(COUNTS.to(dtype)).sum()
    out = out + td.Gamma(2.0, rate).log_prob(torch.ones(4, dtype=dtype)).sum()
    probs = torch.sigmoid(raw[4:6]).clamp(1e-6, 1 - 1e-6)
    out = out + td.Beta(probs * 3 + 0.5, 2.0).log_prob(torch.tensor([0.2, 0.7], dtype=dtype)).sum()
    logits = torch.stack([raw[:3], raw[1:4], raw[3:6], raw[:3] * 2]).clone()
    logits.masked_fill_(logits > 3.0, 3.0)
    out = out + td.Categorical(logits=logits).log_prob(LABELS).sum()
    out = out + td.StudentT(scale + 1.0, loc[0], 1.5).log_prob(raw[0]) + torch.logsumexp(raw, 0)
    out = out + torch.special.digamma(scale + 1.0) + torch.where(raw > 0, raw, -raw).mean()
    out = out + raw.max() - raw[:4].min(0).values + raw.std() + torch.maximum(raw, loc[1]).sum()
    return out + td.Dirichlet(torch.ones(3, dtype=dtype) * 1.5).log_prob(
        torch.softmax(raw[:3], 0)
    )


@pytest.fixture(autouse=True)
def no_validation():
    """As in Pyro's potential (validation checks are Python branches on values)."""
    td.Distribution.set_default_validate_args(False)
    yield
    td.Distribution.set_default_validate_args(True)


def _torch_value_and_grad(fn, points):
    rows = []
    for point in points:
        x = point.clone().requires_grad_(True)
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        rows.append((value.detach().numpy(), grad.numpy()))
    values, grads = zip(*rows, strict=True)
    return np.stack(values), np.stack(grads)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_potential_of_torch_distributions_lowers_to_the_same_value_and_gradient(dtype):
    with jax.enable_x64(dtype == "float64"):
        generator = torch.Generator().manual_seed(0)
        points = torch.randn(16, DIM, dtype=getattr(torch, dtype), generator=generator)
        fn = lower_to_jax(logdensity, points[0])
        value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(fn)))
        values, grads = value_and_grad(jnp.asarray(points.numpy()))
        assert values.dtype == jnp.dtype(dtype) and grads.shape == (16, DIM)
        reference = _torch_value_and_grad(logdensity, points)
        assert agrees_with_torch(value_and_grad, points.numpy(), reference)
        # a translation error would be far larger than this check's rounding tolerance
        wrong = (reference[0] + 1e-2 * np.abs(reference[0]).max(), reference[1])
        assert not agrees_with_torch(value_and_grad, points.numpy(), wrong)


def test_an_op_without_translation_is_named():
    with pytest.raises(LoweringError, match=r"no JAX translation of \['aten.gelu.default'\]"):
        lower_to_jax(lambda x: torch.nn.functional.gelu(x).sum(), torch.zeros(3))


def test_float64_without_x64_computes_in_float32_and_is_checked_at_float32_rounding():
    points = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = _torch_value_and_grad(logdensity, points)
    with jax.enable_x64(False):
        fn = lower_to_jax(logdensity, points[0])
        value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(fn)))
        assert value_and_grad(points.numpy())[0].dtype == jnp.float32
        assert agrees_with_torch(value_and_grad, points.numpy(), reference)
    with jax.enable_x64(True):  # the same comparison at float64 rounding would fail
        float32_values = jax.jit(jax.vmap(fn))(jnp.asarray(points.numpy(), jnp.float32))
        assert not np.allclose(float32_values, reference[0], rtol=1e-9, atol=0)


def test_a_function_that_cannot_be_recorded_is_a_lowering_error():
    with pytest.raises(LoweringError, match="could not be recorded"):
        lower_to_jax(lambda x: torch.tensor(float(x.sum().item() > 0)) * x.sum(), torch.zeros(3))


def _models():
    """Pyro models that need the less common translations: a GP (Cholesky, triangular solves,
    eye), an LKJ prior (a boolean mask folded to a constant, arange, cumprod, pad, mvlgamma), a
    marginalised mixture (logsumexp) and a low-rank MVN (slice_scatter)."""
    pyro = pytest.importorskip("pyro")
    dist = pyro.distributions

    def gp(x, y):
        var = pyro.sample("var", dist.LogNormal(0.0, 1.0))
        length = pyro.sample("length", dist.LogNormal(0.0, 1.0))
        noise = pyro.sample("noise", dist.LogNormal(-2.0, 1.0))
        kernel = var * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / length**2)
        cov = kernel + (noise + 1e-4) * torch.eye(len(x))
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(len(x)), cov), obs=y)

    def lkj(y):
        corr = pyro.sample("corr", dist.LKJCholesky(3, 2.0))
        scale = pyro.sample("scale", dist.HalfNormal(torch.ones(3)).to_event(1))
        with pyro.plate("data", y.shape[0]):
            likelihood = dist.MultivariateNormal(torch.zeros(3), scale_tril=scale[:, None] * corr)
            pyro.sample("y", likelihood, obs=y)

    def mixture(y):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
        scale = pyro.sample("scale", dist.HalfNormal(2.0))
        log_lik = dist.Normal(locs, scale).log_prob(y[:, None]) + weights.log()
        pyro.factor("lik", torch.logsumexp(log_lik, -1).sum())

    def low_rank(y):
        factor = pyro.sample("factor", dist.Normal(0.0, 1.0).expand([4, 2]).to_event(2))
        diag = pyro.sample("diag", dist.LogNormal(torch.zeros(4), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.LowRankMultivariateNormal(torch.zeros(4), factor, diag), obs=y)

    rng = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 20)
    return {
        "gp": (gp, dict(x=x, y=torch.sin(x) + 0.1 * torch.randn(20, generator=rng))),
        "lkj": (lkj, dict(y=torch.randn(25, 3, generator=rng))),
        "mixture": (mixture, dict(y=torch.randn(40, generator=rng) + torch.arange(40) % 2 * 6 - 3)),
        "low_rank": (low_rank, dict(y=torch.randn(25, 4, generator=rng))),
    }


@pytest.mark.parametrize("name", ["gp", "lkj", "mixture", "low_rank"])
def test_pyro_models_compile_and_agree_with_torch_off_the_check_points(name):
    from emdppl import bridge

    model, data = _models()[name]
    compiled = bridge.target_from_pyro(model, model_kwargs=data, num_chains=4, evaluate="jax")
    host = bridge.target_from_pyro(model, model_kwargs=data, num_chains=4, evaluate="torch")
    assert isinstance(compiled.logdensity_fn, bridge.LoweredLogDensity)
    keys = jax.random.split(jax.random.key(1), len(compiled.initial_position))
    points = {  # 32 fresh points, none of which the build-time check saw
        k: jax.random.uniform(key, (32, *v.shape[1:]), minval=-1.5, maxval=1.5)
        for key, (k, v) in zip(keys, sorted(compiled.initial_position.items()), strict=True)
    }
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(compiled.logdensity_fn)))(points)
    ref_values, ref_grads = jax.jit(jax.vmap(jax.value_and_grad(host.logdensity_fn)))(points)
    scale = float(np.max(np.abs(ref_values)))
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5 * scale)
    for k in grads:
        g_scale = float(np.max(np.abs(ref_grads[k])))
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * g_scale)
