"""Models and arguments that NumPyro's NUTS accepts: data used as Python values (``static=``,
or made static with a warning), lists as data, discrete latents marked
``infer={"enumerate": "parallel"}`` summed out (funsor). Ports of NumPyro's
``examples/ucbadmit.py`` and ``examples/annotation.py`` agree with NumPyro's own NUTS; an
enumerated Gaussian mixture agrees with its hand-marginalised twin; no retracing; clear errors.

Agreement: z = (mean_a - mean_b) / sqrt(mcse_a^2 + mcse_b^2) per scalar, |z| < 4 (two-sided
p = 6.3e-5 per scalar; at most 4 scalars per test: family-wise false-alarm rate < 3e-4).
"""

import warnings

import arviz as az
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import expit, logsumexp
from numpyro.infer import MCMC, NUTS

import emdppl
from emdppl.target import StaticArguments

# ------------------------------------------------------------------------- models and data

# UCBadmit (NumPyro's examples/ucbadmit.py): admissions by department and gender.
DEPT = np.repeat(np.arange(6), 2)
MALE = np.tile([1, 0], 6)
APPLICATIONS = np.array([825, 108, 560, 25, 325, 593, 417, 375, 191, 393, 373, 341])
ADMIT = np.array([512, 89, 353, 17, 120, 202, 138, 131, 53, 94, 22, 24])


def glmm(dept, male, applications, admit=None):
    """NumPyro's ``examples/ucbadmit.py`` model as it is (``len(np.unique(dept))``)."""
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(2)))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, concentration=2))
    scale_tril = sigma[..., jnp.newaxis] * L_Rho
    num_dept = len(np.unique(dept))
    z = numpyro.sample("z", dist.Normal(jnp.zeros((num_dept, 2)), 1))
    v = jnp.dot(scale_tril, z.T).T
    logits = v_mu[0] + v[dept, 0] + (v_mu[1] + v[dept, 1]) * male
    if admit is None:
        probs = expit(logits)
        numpyro.sample("probs", dist.Delta(probs), obs=probs)
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


# Dawid & Skene's annotations (NumPyro's examples/annotation.py), classes 0..3, 45 items x 7.
ANNOTATIONS = (
    np.array(
        [
            [1, 1, 1, 1, 1, 1, 1], [3, 3, 3, 4, 3, 3, 4], [1, 1, 2, 2, 1, 2, 2],
            [2, 2, 2, 3, 1, 2, 1], [2, 2, 2, 3, 2, 2, 2], [2, 2, 2, 3, 3, 2, 2],
            [1, 2, 2, 2, 1, 1, 1], [3, 3, 3, 3, 4, 3, 3], [2, 2, 2, 2, 2, 2, 3],
            [2, 3, 2, 2, 2, 2, 3], [4, 4, 4, 4, 4, 4, 4], [2, 2, 2, 3, 3, 4, 3],
            [1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 3, 2, 1, 2], [1, 2, 1, 1, 1, 1, 1],
            [1, 1, 1, 2, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1],
            [2, 2, 2, 2, 2, 2, 1], [2, 2, 2, 1, 3, 2, 2], [2, 2, 2, 2, 2, 2, 2],
            [2, 2, 2, 2, 2, 2, 1], [2, 2, 2, 3, 2, 2, 2], [2, 2, 1, 2, 2, 2, 2],
            [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [2, 3, 2, 2, 2, 2, 2],
            [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 2, 1, 1, 2, 1],
            [1, 1, 1, 1, 1, 1, 1], [3, 3, 3, 3, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1],
            [2, 2, 2, 2, 2, 2, 2], [2, 2, 2, 3, 2, 3, 2], [4, 3, 3, 4, 3, 4, 3],
            [2, 2, 1, 2, 2, 3, 2], [2, 3, 2, 3, 2, 3, 3], [3, 3, 3, 3, 4, 3, 2],
            [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 2, 1, 2, 1, 1, 1],
            [2, 3, 2, 2, 2, 2, 2], [1, 2, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2],
        ]
    )
    - 1
)  # fmt: skip


def multinomial(annotations):
    """NumPyro's ``examples/annotation.py`` multinomial model (``int(np.max(annotations))``),
    its class ``c`` marked for enumeration (NumPyro enumerates it unmarked, with a
    FutureWarning)."""
    num_classes = int(np.max(annotations)) + 1
    num_items, num_positions = annotations.shape
    with numpyro.plate("class", num_classes):
        zeta = numpyro.sample("zeta", dist.Dirichlet(jnp.ones(num_classes)))
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.ones(num_classes)))
    with numpyro.plate("item", num_items, dim=-2):
        c = numpyro.sample("c", dist.Categorical(pi), infer={"enumerate": "parallel"})
        with numpyro.plate("position", num_positions):
            numpyro.sample("y", dist.Categorical(zeta[c]), obs=annotations)


MIXTURE_WEIGHTS = jnp.array([0.3, 0.7])
MIXTURE_PRIOR_LOC = jnp.array([-3.0, 3.0])  # separates the components: no label switching


def mixture_enumerated(y):
    locs = numpyro.sample("locs", dist.Normal(MIXTURE_PRIOR_LOC, 1.0).to_event(1))
    scale = numpyro.sample("scale", dist.HalfNormal(2.0))
    with numpyro.plate("data", y.shape[0]):
        k = numpyro.sample("k", dist.Categorical(MIXTURE_WEIGHTS), infer={"enumerate": "parallel"})
        numpyro.sample("y", dist.Normal(locs[k], scale), obs=y)


def mixture_marginalised(y):
    locs = numpyro.sample("locs", dist.Normal(MIXTURE_PRIOR_LOC, 1.0).to_event(1))
    scale = numpyro.sample("scale", dist.HalfNormal(2.0))
    log_joint = jnp.log(MIXTURE_WEIGHTS) + dist.Normal(locs, scale).log_prob(y[:, None])
    numpyro.factor("y", jnp.sum(logsumexp(log_joint, axis=-1)))


# ------------------------------------------------------------------------------- helpers


def _scalars(draws: dict) -> dict[str, np.ndarray]:
    """``{name[i]: array (chain, draw)}`` for every scalar of ``{name: (chain, draw, ...)}``."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        flat = value.reshape(*value.shape[:2], -1)
        for i in range(flat.shape[-1]):
            out[f"{name}[{i}]"] = flat[..., i]
    return out


def _z(ours: dict, theirs: dict) -> dict[str, float]:
    """z of the posterior means of every scalar, MCSE from ArviZ on both sides."""
    a, b = _scalars(ours), _scalars(theirs)
    sa = az.summary(az.from_dict(posterior=a))
    sb = az.summary(az.from_dict(posterior=b))
    return {
        k: float(
            (sa.loc[k, "mean"] - sb.loc[k, "mean"])
            / np.hypot(sa.loc[k, "mcse_mean"], sb.loc[k, "mcse_mean"])
        )
        for k in a
    }


def _numpyro_nuts(model, *args, num_warmup: int, num_samples: int, seed: int) -> dict:
    """NumPyro's own NUTS, two chains: ``{site: array (chain, draw, ...)}``."""
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NumPyro on unmarked enumeration
        mcmc.run(jax.random.key(seed), *args)
    return mcmc.get_samples(group_by_chain=True)


def _quiet(**kwargs):
    """emdppl.MCMC('nuts') with two chains."""
    return emdppl.MCMC("nuts", num_chains=2, **kwargs)


# ---------------------------------------------------------------------- data as Python values


def test_ucbadmit_with_static_dept_matches_numpyro():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LKJCholesky left centered
        idata = emdppl.infer(
            glmm,
            _quiet(num_warmup=300, num_samples=500),
            model_args=(DEPT, MALE, APPLICATIONS, ADMIT),
            static=("dept",),
            rng_key=0,
            progress_bar=False,
        )
    theirs = _numpyro_nuts(
        glmm, DEPT, MALE, APPLICATIONS, ADMIT, num_warmup=300, num_samples=500, seed=1
    )
    names = ("v_mu", "sigma")
    zs = _z({k: idata.posterior[k].values for k in names}, {k: theirs[k] for k in names})
    assert max(abs(z) for z in zs.values()) < 4.0, zs
    # dept is bound into the model (a constant); the other arrays stay data
    assert "dept" in idata.constant_data and idata.log_likelihood["admit"].shape == (2, 500, 12)


def test_concrete_data_are_made_static_with_a_warning():
    args = (DEPT, MALE, APPLICATIONS, ADMIT)
    with pytest.warns(UserWarning, match=r"glmm uses its data as Python values.*static=\("):
        problem = emdppl.Problem.of(glmm, model_args=args)
    assert isinstance(problem.model, StaticArguments)
    assert sorted(problem.model.static) == sorted(["dept", "male", "applications", "admit"])
    assert problem.model_args == () and problem.model_kwargs == {}
    # named explicitly: no warning, and only dept is a constant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = emdppl.Problem.of(glmm, model_args=args, static="dept")
    assert list(explicit.model.static) == ["dept"]
    assert sorted(explicit.model_kwargs) == ["admit", "applications", "male"]
    # the bound model takes the other arguments by position too, in its own signature's order
    seeded = numpyro.handlers.seed(explicit.model, 0)
    trace = numpyro.handlers.trace(seeded).get_trace(MALE, APPLICATIONS, ADMIT)
    np.testing.assert_array_equal(trace["admit"]["value"], ADMIT)
    assert trace["z"]["value"].shape == (6, 2)


def _log_density_at_start(model, model_args, **kwargs) -> float:
    """Build the model's target and evaluate its jitted log density at the first chain's
    start: traces the model the way every algorithm does (initial positions, log density)."""
    target = emdppl.Problem.of(model, model_args=model_args, **kwargs).target(2, 0)
    first = jax.tree.map(lambda x: x[0], target.initial_position)
    return float(_evaluate(target.logdensity_fn, first))


_evaluate = eqx.filter_jit(lambda logdensity_fn, position: logdensity_fn(position))


def test_equal_static_data_do_not_retrace_new_ones_do():
    traces = []

    def counted(n, y):
        traces.append(1)  # runs only while JAX traces the model
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        numpyro.sample("y", dist.Normal(mu, 1.0).expand([int(np.max(n))]), obs=y)

    first_value = _log_density_at_start(counted, (np.array([3]), np.zeros(3)), static="n")
    first = len(traces)
    # an equal (new) static array and new traced data: the same compiled code, a new value
    value = _log_density_at_start(counted, (np.array([3]), np.ones(3)), static="n")
    assert len(traces) == first and value != first_value
    _log_density_at_start(counted, (np.array([4]), np.ones(4)), static="n")  # compiles anew
    assert len(traces) > first


def test_arrays_used_as_arrays_are_still_not_retraced():
    traces = []

    def counted(x, y):
        traces.append(1)
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    x = np.linspace(-1.0, 1.0, 5)
    first_value = _log_density_at_start(counted, (x, 2 * x))
    first = len(traces)
    value = _log_density_at_start(counted, (x + 1, [3.0] * 5))  # a list is an array too
    assert len(traces) == first and value != first_value


def test_list_data_are_arrays():
    # y_i ~ N(mu, 1), mu ~ N(0, 10^2): posterior N(sum(y) / (n + 1/100), 1 / (n + 1/100))
    y = [0.5, 1.5, 2.0, 1.0, 0.0, 1.2, 0.8, 1.1]

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("data", len(y)):
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    idata = emdppl.infer(
        model, _quiet(num_warmup=200, num_samples=1000), model_args=(y,), progress_bar=False
    )
    precision = len(y) + 1e-2
    summary = az.summary(idata, var_names=["mu"])
    z = (summary.loc["mu", "mean"] - sum(y) / precision) / summary.loc["mu", "mcse_mean"]
    assert abs(z) < 4.0, z
    np.testing.assert_allclose(idata.observed_data["y"], y, rtol=1e-6)  # float32
    assert idata.log_likelihood["y"].shape == (2, 1000, 8)


# ------------------------------------------------------------------ enumerated discrete latents


def test_annotation_model_enumerated_matches_numpyro():
    with pytest.warns(UserWarning, match="no log_likelihood group.*'c'"), warnings.catch_warnings():
        # the two chains sit in different permutations of the classes: R-hat of zeta is large
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = emdppl.infer(
            multinomial,
            _quiet(num_warmup=300, num_samples=500),
            model_args=(ANNOTATIONS,),
            static="annotations",
            rng_key=0,
            progress_bar=False,
        )
    assert "c" not in idata.posterior and "log_likelihood" not in idata.groups()
    theirs = _numpyro_nuts(multinomial, ANNOTATIONS, num_warmup=300, num_samples=500, seed=1)
    # the classes are exchangeable (label switching): compare the sorted class weights
    ours = {"pi_sorted": np.sort(idata.posterior["pi"].values, axis=-1)}
    zs = _z(ours, {"pi_sorted": np.sort(np.asarray(theirs["pi"]), axis=-1)})
    assert max(abs(z) for z in zs.values()) < 4.0, zs


def test_enumerated_mixture_matches_hand_marginalised():
    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.7
    y = np.where(labels, 3.0, -3.0) + rng.normal(size=60)
    settings = dict(model_args=(y,), rng_key=0, progress_bar=False)
    with pytest.warns(UserWarning, match="no log_likelihood group"):
        enumerated = emdppl.infer(
            mixture_enumerated, _quiet(num_warmup=300, num_samples=800), **settings
        )
    marginalised = emdppl.infer(
        mixture_marginalised, _quiet(num_warmup=300, num_samples=800), **{**settings, "rng_key": 1}
    )
    names = ("locs", "scale")
    zs = _z(
        {k: enumerated.posterior[k].values for k in names},
        {k: marginalised.posterior[k].values for k in names},
    )
    assert max(abs(z) for z in zs.values()) < 4.0, zs
    # the log density is the marginal one: equal at equal positions (the same site names)
    targets = [
        emdppl.Target.from_numpyro(m, model_args=(y,), num_chains=1)
        for m in (mixture_enumerated, mixture_marginalised)
    ]
    position = jax.tree.map(lambda x: x[0], targets[0].initial_position)
    values = [float(_evaluate(t.logdensity_fn, position)) for t in targets]
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5)


HMM_Y = np.array([0.1, -0.3, 2.2, 1.8, 2.5, -0.2, 0.4, 2.1])


def hmm_enumerated(y):
    """Two hidden states, x_0 ~ Bernoulli(1/2), x_t = x_{t-1} with probability p_stay;
    y_t ~ N(mu * x_t, 1). Each x_t is enumerated (2^T terms, summed by funsor)."""
    p_stay = numpyro.sample("p_stay", dist.Beta(2.0, 2.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    x = 0
    for t in range(len(y)):
        probs = 0.5 if t == 0 else jnp.where(x == 1, p_stay, 1 - p_stay)
        x = numpyro.sample(f"x_{t}", dist.Bernoulli(probs), infer={"enumerate": "parallel"})
        numpyro.sample(f"y_{t}", dist.Normal(mu * x, 1.0), obs=y[t])


def hmm_forward(y):
    """The same model, its states summed out by the forward algorithm."""
    p_stay = numpyro.sample("p_stay", dist.Beta(2.0, 2.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
    log_transition = jnp.log(jnp.array([[p_stay, 1 - p_stay], [1 - p_stay, p_stay]]))
    log_emission = dist.Normal(mu * jnp.arange(2.0), 1.0).log_prob(jnp.asarray(y)[:, None])
    alpha = jnp.log(0.5) + log_emission[0]
    for t in range(1, len(y)):
        alpha = logsumexp(alpha[:, None] + log_transition, axis=0) + log_emission[t]
    numpyro.factor("y", logsumexp(alpha))


def test_enumerated_hmm_log_density_is_the_forward_algorithm():
    targets = [
        emdppl.Target.from_numpyro(m, model_args=(HMM_Y,), num_chains=3, rng_key=2)
        for m in (hmm_enumerated, hmm_forward)
    ]
    for chain in range(3):  # three random positions, the same names in both forms
        position = jax.tree.map(lambda x, c=chain: x[c], targets[0].initial_position)
        values = [float(_evaluate(t.logdensity_fn, position)) for t in targets]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-5)


# ------------------------------------------------------------------------------- bad input


def test_unmarked_discrete_latent_points_to_enumeration():
    def model():
        numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"discrete latent.*'k'.*enumerate.*config_enumerate"):
        emdppl.infer(model, "nuts", progress_bar=False)


def test_static_name_that_is_no_argument():
    with pytest.raises(ValueError, match=r"static=\('dpt',\).*\['dpt'\] are not arguments"):
        emdppl.Problem.of(glmm, model_args=(DEPT, MALE, APPLICATIONS, ADMIT), static=("dpt",))
    with pytest.raises(TypeError, match="static must name model arguments"):
        emdppl.Problem.of(glmm, model_args=(DEPT, MALE, APPLICATIONS, ADMIT), static=(0,))
    target = emdppl.Target.from_logdensity(lambda x: -x @ x, jnp.zeros(2), num_chains=1)
    with pytest.raises(ValueError, match="a Target has none"):
        emdppl.Problem.of(target, static="x")


def test_static_names_of_a_pyro_model_are_checked_too():
    """A Pyro model runs eagerly (static= binds nothing), but a name that is no argument is the
    same clear error as for NumPyro, not silently ignored."""
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")

    def pyro_model(n, y):
        mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", int(n)):
            pyro.sample("y", pyro.distributions.Normal(mu, 1.0), obs=y)

    kwargs = dict(n=3, y=torch.zeros(3))
    with pytest.raises(ValueError, match=r"static=\('m',\).*\['m'\] are not arguments"):
        emdppl.Problem.of(pyro_model, model_kwargs=kwargs, static="m")
    assert emdppl.Problem.of(pyro_model, model_kwargs=kwargs, static="n").backend == "pyro"


def test_latent_used_as_python_value_is_refused():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        if mu > 0:  # a latent's value as a Python bool
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"even with its array arguments \['y'\] static"):
        emdppl.Problem.of(model, model_args=(np.zeros(3),))
    with pytest.raises(ValueError, match=r"although static=\('y',\)"):
        emdppl.Problem.of(model, model_args=(np.zeros(3),), static="y")


def test_init_values_for_an_enumerated_site_are_refused():
    """An enumerated discrete site is summed out, not sampled: no initial value for it, and the
    sites named in the error are the continuous ones."""
    y = np.array([3.1, -2.9, 2.7])
    with pytest.raises(ValueError, match=r"init values for \['k'\].*sampled sites are \[") as err:
        emdppl.infer(mixture_enumerated, emdppl.MCMC(init={"k": 0}), model_args=(y,))
    assert "'k'" not in str(err.value).split("sampled sites are")[1]
