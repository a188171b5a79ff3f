"""``benchmarks/posteriordb_models.py``: the ODE solve and the ODE posteriors' log densities.

The solver is checked against closed-form solutions; the models at posteriordb's reference
mean, where a correct port has a finite log density and gradient, and, for Lotka-Volterra,
the populations the published fit describes.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import posteriordb_models as pm  # noqa: E402


def test_solve_ode_matches_closed_forms_and_is_nan_past_its_step_budget():
    ts = jnp.linspace(0.5, 5.0, 10)
    decay = pm.solve_ode(lambda t, y, k: -k * y, jnp.array(2.0), ts, 0.7, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(decay, 2.0 * np.exp(-0.7 * np.asarray(ts)), rtol=1e-4)
    # a harmonic oscillator, and the gradient of its solution in the frequency (reverse mode)
    def position(w):
        rhs = lambda t, y, w: jnp.stack([y[1], -(w**2) * y[0]])
        return pm.solve_ode(rhs, jnp.array([1.0, 0.0]), ts, w, rtol=1e-7, atol=1e-7)[:, 0]

    np.testing.assert_allclose(position(1.3), np.cos(1.3 * np.asarray(ts)), atol=1e-4)
    np.testing.assert_allclose(
        jax.jacrev(position)(1.3), -np.asarray(ts) * np.sin(1.3 * np.asarray(ts)), atol=1e-3
    )
    stiff = pm.solve_ode(lambda t, y, k: -k * y, jnp.array(1.0), ts, 1e4, rtol=1e-8,
                         atol=1e-8, max_steps=8)
    assert np.isnan(np.asarray(stiff)).all()


@pytest.mark.parametrize("name", sorted(pm.ODE_MODELS))
def test_ode_posteriors_have_a_finite_density_and_gradient_at_the_reference_mean(name):
    bench = pm.ODE_MODELS[name]
    data = bench.load_kwargs()
    reference = bench.reference()
    point = {site: jnp.asarray(reference[site]["mean"], jnp.float32) for site in bench.var_names}

    def log_joint(values):
        return log_density(bench.model, (), data, values)[0]

    value, grad = jax.value_and_grad(log_joint)(point)
    assert np.isfinite(value)
    assert all(np.isfinite(np.asarray(g)).all() for g in grad.values())


def test_lotka_volterra_at_the_reference_mean_tracks_the_pelts():
    """At posteriordb's posterior mean the fitted populations follow the data: the residual
    log-scale sd is about the posterior mean of sigma (0.25), not the data's own spread."""
    bench = pm.ODE_MODELS["lotka_volterra"]
    data = bench.load_kwargs()
    ref = bench.reference()
    z = pm.solve_ode(
        pm.predator_prey, jnp.asarray(ref["z_init"]["mean"], jnp.float32),
        jnp.asarray(data["ts"]), jnp.asarray(ref["theta"]["mean"], jnp.float32),
        rtol=1e-6, atol=1e-6,
    )
    residual = np.log(data["y"]) - np.log(np.asarray(z))
    assert residual.std(0) == pytest.approx(ref["sigma"]["mean"], abs=0.1)
    assert (np.log(data["y"]).std(0) > 2 * residual.std(0)).all()
