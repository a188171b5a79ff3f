"""The torch bridge: one host round trip per value-and-gradient, batched chains, torch teachers
on the VE schedule (exact Gaussian-mixture scores, VP conversion, distillation), clear errors,
and emdppl without torch."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import emdppl  # noqa: E402
from emdppl import bridge, generators, teachers  # noqa: E402

LOCS = np.array([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]])
SCALES = np.array([0.4, 0.7, 0.3])
WEIGHTS = np.array([0.5, 0.3, 0.2])


def _gaussian_logdensity(x):
    return -0.5 * torch.sum((x - 1.0) ** 2 / torch.arange(1, x.shape[0] + 1, dtype=x.dtype))


def _count_calls(host, name):
    calls = []
    method = getattr(host, name)

    def counted(x, *args):
        calls.append(np.shape(x))
        return method(x, *args)

    setattr(host, name, counted)
    return calls


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_logdensity_value_grad_one_round_trip_per_batch(batching):
    example = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    logdensity = bridge.torch_logdensity(_gaussian_logdensity, example, batching=batching)
    value_and_grad_calls = _count_calls(logdensity.host, "value_and_grad")
    value_calls = _count_calls(logdensity.host, "value")
    x = {"a": jax.random.normal(jax.random.key(0), (4, 2)), "b": jnp.arange(4.0)}
    batched = jax.jit(jax.vmap(jax.value_and_grad(logdensity)))
    values, grads = batched(x)
    # one callback for the 4 chains, value and gradient together; no value-only call
    assert value_and_grad_calls == [(4, 3)] and value_calls == []
    # on CPU a buffer callback (XLA's buffers as numpy views), not pure_callback's copies
    lowered = batched.lower(x).as_text()
    assert "xla_buffer_python_cpu_callback" in lowered
    assert "xla_ffi_python_cpu_callback" not in lowered  # what pure_callback lowers to
    flat = jnp.concatenate([x["a"], x["b"][:, None]], axis=1)  # ravel order: a, b
    var = jnp.arange(1.0, 4.0)
    np.testing.assert_allclose(values, -0.5 * jnp.sum((flat - 1) ** 2 / var, -1), rtol=1e-6)
    np.testing.assert_allclose(grads["a"], -((flat - 1) / var)[:, :2], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], -((flat - 1) / var)[:, 2], rtol=1e-6)
    assert values.dtype == jnp.float32
    if batching == "vmap":  # the batch of 4 ran through the traced graph, built on that batch
        assert logdensity.host.traced[4] is not None
    # a plain call evaluates the value only
    np.testing.assert_allclose(logdensity({"a": flat[0, :2], "b": flat[0, 2]}), values[0])
    assert value_calls == [(3,)]


def test_off_cpu_path_pure_callback_gives_the_same_values(monkeypatch):
    """The path a GPU or TPU program takes (``jax.pure_callback``), forced on the CPU by making
    ``platform_dependent`` pick its default branch: the same values and gradients as the
    buffer callback, one round trip per batch, and the program lowers to pure_callback."""
    example = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    x = {"a": jax.random.normal(jax.random.key(0), (4, 2)), "b": jnp.arange(4.0)}
    on_cpu = bridge.torch_logdensity(_gaussian_logdensity, example)
    expected = jax.jit(jax.vmap(jax.value_and_grad(on_cpu)))(x)

    def default_branch(*args, default, **branches):
        return default(*args)

    monkeypatch.setattr(jax.lax, "platform_dependent", default_branch)
    elsewhere = bridge.torch_logdensity(_gaussian_logdensity, example)
    calls = _count_calls(elsewhere.host, "value_and_grad")
    batched = jax.jit(jax.vmap(jax.value_and_grad(elsewhere)))
    values, grads = batched(x)
    assert calls == [(4, 3)]
    lowered = batched.lower(x).as_text()
    assert "xla_ffi_python_cpu_callback" in lowered
    assert "xla_buffer_python_cpu_callback" not in lowered
    np.testing.assert_array_equal(values, expected[0])
    for name in ("a", "b"):
        np.testing.assert_array_equal(grads[name], expected[1][name])


def test_traced_batch_graph_equals_vmap_and_steps_aside_when_it_would_freeze_state():
    """The traced graph of a batch size reproduces torch.func.vmap on new batches of that size;
    a function whose value depends on Python state (a counter the trace would bake in) fails the
    agreement check on its first batch, and keeps being evaluated by vmap, state and all."""
    example = jnp.zeros(3)
    logdensity = bridge.torch_logdensity(_gaussian_logdensity, example)
    host = logdensity.host
    first, later = (np.random.default_rng(i).normal(size=(5, 3)) for i in (0, 1))
    host.value_and_grad(first)
    assert host.traced[5] is not None
    traced = host.value_and_grad(later)
    reference = torch.func.vmap(torch.func.grad_and_value(_gaussian_logdensity))(
        torch.as_tensor(later)
    )
    np.testing.assert_allclose(traced[0], reference[1].numpy(), rtol=1e-12)
    np.testing.assert_allclose(traced[1], reference[0].numpy(), rtol=1e-12)

    calls = []

    def stateful(x):
        calls.append(None)
        return _gaussian_logdensity(x) * len(calls)

    host = bridge.torch_logdensity(stateful, example).host
    values, _ = host.value_and_grad(first)
    assert host.traced[5] is None  # the frozen counter disagreed with the live one
    values_again, _ = host.value_and_grad(first)
    np.testing.assert_allclose(values_again / values, (len(calls)) / (len(calls) - 1))


def test_logdensity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batching must be one of"):
        bridge.torch_logdensity(_gaussian_logdensity, jnp.zeros(2), batching="threads")
    with pytest.raises(TypeError, match="torch function"):
        bridge.torch_logdensity("not a function", jnp.zeros(2))


def test_check_devices_names_each_tensor():
    tensors = {"y": torch.zeros(2), "sigma": torch.zeros(2, device="meta")}
    with pytest.raises(ValueError, match=r"y on cpu, sigma on meta"):
        bridge.check_devices(tensors)
    assert bridge.check_devices({"y": torch.zeros(2), "n": 3}) == torch.device("cpu")


# ------------------------------------------------------------------------------------------
# Teachers


def _torch_mixture_score(x, sigma):
    """Exact VE score of the mixture, torch, x (B, d), sigma (B,)."""
    locs, scales, weights = (torch.as_tensor(a, dtype=x.dtype) for a in (LOCS, SCALES, WEIGHTS))
    var = scales[None, :, None] ** 2 + sigma[:, None, None] ** 2  # (B, K, 1)
    diff = locs[None] - x[:, None]  # (B, K, d)
    logp = torch.log(weights) - 0.5 * torch.sum(torch.log(2 * torch.pi * var) + diff**2 / var, -1)
    resp = torch.softmax(logp, -1)
    return torch.einsum("bk,bkd->bd", resp, diff / var)


class EpsilonMixture(torch.nn.Module):
    """The mixture's exact noise prediction, eps = -sigma * score (VE input)."""

    def forward(self, x, sigma):
        return -sigma[:, None] * _torch_mixture_score(x, sigma)


class DenoiserMixture(torch.nn.Module):
    def forward(self, x, sigma):
        return x + sigma[:, None] ** 2 * _torch_mixture_score(x, sigma)


class VPEpsilonMixture(torch.nn.Module):
    """Exact noise prediction in the VP (DDPM) convention with a discrete alphas_cumprod."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.log_sigmas = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)

    def forward(self, x_in, t):
        log_sigma = np.interp(t.numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)
        sigma = torch.as_tensor(np.exp(log_sigma), dtype=x_in.dtype)
        x = x_in * torch.sqrt(1 + sigma[:, None] ** 2)
        return -sigma[:, None] * _torch_mixture_score(x, sigma)


def _jax_mixture():
    return teachers.GaussianMixture(LOCS, SCALES, WEIGHTS)


def _points(n=16):
    x = 2 * jax.random.normal(jax.random.key(1), (n, 2))
    sigma = jnp.exp(jax.random.uniform(jax.random.key(2), (n,), minval=-3.0, maxval=1.0))
    return x, sigma


@pytest.mark.parametrize(
    "module,prediction", [(EpsilonMixture(), "epsilon"), (DenoiserMixture(), "denoiser")]
)
def test_torch_teacher_is_the_exact_score(module, prediction):
    teacher = bridge.from_torch(module, prediction=prediction, sample_shape=(2,))
    score_calls = _count_calls(teacher.host, "score")
    x, sigma = _points()
    expected = jax.vmap(_jax_mixture().score)(x, sigma)
    got = jax.jit(jax.vmap(teacher.score))(x, sigma)
    assert score_calls == [(16, 2)]  # the batch reaches torch once
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    # differentiable in x through torch autograd (the generator's E-step z-gradient needs it)
    jac = jax.jacobian(teacher.score)(x[0], sigma[0])
    np.testing.assert_allclose(jac, jax.jacobian(_jax_mixture().score)(x[0], sigma[0]), atol=1e-4)


def test_vp_schedule_maps_to_ve_score():
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    teacher = bridge.from_torch(
        VPEpsilonMixture(alphas_cumprod), schedule=torch.as_tensor(alphas_cumprod),
        sample_shape=(2,),
    )
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    assert teacher.sigma_min == pytest.approx(sigmas[0]) and teacher.sigma_max == pytest.approx(
        sigmas[-1]
    )
    x, _ = _points(5)
    sigma = jnp.asarray(sigmas[[10, 100, 400, 700, 999]], jnp.float32)
    expected = jax.vmap(_jax_mixture().score)(x, sigma)
    np.testing.assert_allclose(jax.vmap(teacher.score)(x, sigma), expected, rtol=1e-3, atol=1e-4)


def test_torch_teacher_distills_like_the_jax_teacher():
    """Same seed and generator: EMD on the torch teacher == EMD on the JAX teacher (an affine
    generator has an exact diffused marginal, so no student network enters)."""
    jax_teacher = _jax_mixture()
    torch_teacher = bridge.from_torch(
        EpsilonMixture(), sample_shape=(2,), sigma_data=jax_teacher.sigma_data
    )
    results = []
    for teacher in (jax_teacher, torch_teacher):
        results.append(
            emdppl.distill(
                teacher,
                generators.affine(2),
                num_steps=4,
                batch_size=32,
                num_estep_steps=3,
                sigma_range=(0.05, 1.0),
                num_probe_draws=0,
                rng_key=5,
                progress_bar=False,
            )
        )
    for a, b in zip(
        jax.tree.leaves(results[0].state.theta), jax.tree.leaves(results[1].state.theta),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        results[0].history["loss"], results[1].history["loss"], rtol=1e-3, atol=1e-5
    )


def test_wrong_output_shape_is_a_clear_error():
    class Wrong(torch.nn.Module):
        def forward(self, x, sigma):
            return torch.zeros(x.shape[0], 3)

    with pytest.raises(ValueError, match=r"returned shape \(2, 3\).*\(2, 2\)"):
        bridge.from_torch(Wrong(), sample_shape=(2,))
    with pytest.raises(ValueError, match="prediction must be one of"):
        bridge.from_torch(EpsilonMixture(), prediction="v", sample_shape=(2,))
    with pytest.raises(ValueError, match="strictly decreasing"):
        bridge.from_torch(EpsilonMixture(), schedule=np.linspace(0.1, 0.9, 5), sample_shape=(2,))


def test_module_on_two_devices_is_a_clear_error():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"parameter 0 on cpu.*parameter 2 on meta"):
        bridge.from_torch(module, sample_shape=(2,))


def test_diffusers_unet_teacher():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    alphas_cumprod = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    teacher = bridge.from_torch(unet, schedule=alphas_cumprod, sample_shape=(1, 8, 8))
    assert teacher.data_dim == 64
    x = jax.random.normal(jax.random.key(0), (3, 64))
    sigma = jnp.array([0.1, 1.0, 10.0])
    score = jax.jit(jax.vmap(teacher.score))(x, sigma)
    assert score.shape == (3, 64) and bool(jnp.all(jnp.isfinite(score)))
    # the bridge agrees with calling the UNet by hand (epsilon prediction, VP input)
    ac = alphas_cumprod.numpy().astype(np.float64)
    t = np.interp(np.log(1.0), 0.5 * np.log((1 - ac) / ac), np.arange(1000))
    with torch.no_grad():
        x_in = torch.as_tensor(np.asarray(x[1]) / np.sqrt(2.0)).reshape(1, 1, 8, 8)
        eps = unet(x_in.float(), torch.tensor([t], dtype=torch.float32)).sample
    np.testing.assert_allclose(score[1], -eps.numpy().reshape(64), rtol=1e-4, atol=1e-5)


def test_emdppl_works_without_torch():
    code = textwrap.dedent(
        """
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "pyro"):
                    raise ImportError(f"No module named {name!r} (blocked)")

        sys.meta_path.insert(0, BlockTorch())
        import jax.numpy as jnp
        import emdppl, emdppl.bridge
        from emdppl.models import EIGHT_SCHOOLS, eight_schools
        assert not emdppl.bridge.is_pyro_model(eight_schools)
        assert "torch" not in sys.modules and "pyro" not in sys.modules
        target = emdppl.Target.from_numpyro(eight_schools, model_kwargs=EIGHT_SCHOOLS)
        for call in (
            lambda: emdppl.bridge.target_from_pyro(eight_schools),
            lambda: emdppl.bridge.check_auxiliary_pyro(eight_schools),
            lambda: emdppl.bridge.torch_logdensity(lambda x: x.sum(), jnp.zeros(2)),
            lambda: emdppl.bridge.from_torch(lambda x, t: x, sample_shape=(2,)),
        ):
            try:
                call()
            except ImportError as err:
                assert "pip install 'emdppl[pyro]'" in str(err), err
            else:
                raise AssertionError("no ImportError")
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
