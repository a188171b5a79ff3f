r"""AEVB (a variational autoencoder) on scikit-learn's digits, against Monte-Carlo EM with HMC.

Data: the 1797 8x8 digits of ``sklearn.datasets.load_digits``, scaled to [0, 1] and binarised at
0.5; train ``[:1000]``, validation ``[1000:1350]``, test ``[1350:]``. Binarising makes the
Bernoulli decoder a proper likelihood, so the reported log-likelihoods are log-probabilities in
nats that both methods share (a Bernoulli likelihood on grey levels is not normalised; a
continuous Bernoulli would be, but its normaliser adds noise-free terms that hide the
comparison).

Model (both methods): :math:`z \sim N(0, I_d)`, :math:`x \sim \mathrm{Bernoulli}(
\mathrm{sigmoid}(\mathrm{MLP}_\theta(z)))`, one tanh hidden layer of 200 units (AEVB App. C).

- **AEVB**: ``emdppl.SVI`` with an equinox MLP encoder :math:`q_\phi(z|x) = N(\mu_\phi(x),
  \sigma_\phi(x)^2)` registered by ``eqx_module`` and minibatches of 100 through
  ``numpyro.plate(..., subsample_size=100)``.
- **MCEM** (the AEVB paper's comparison): persistent per-image latent chains; every step picks a
  minibatch, advances its chains by HMC (emdppl's registry kernel, re-initialised on the current
  decoder, step size tuned per image to 90% acceptance) and takes one Adam step on
  :math:`\theta` with the chains' latents. Driven by ``emdppl.run`` like every algorithm.

Reported on the test set: the ELBO (AEVB) and importance-sampled log-likelihoods
:math:`\log \frac1K \sum_k p(x, z_k)/q(z_k)` with ``K >= 1000``: the encoder as proposal for
AEVB; for MCEM (no encoder) a defensive mixture ``0.9 N(m, (1.2 s)^2) + 0.1 N(0, I)`` fitted to
HMC draws of each test image's posterior. Both are stochastic lower bounds on
:math:`\log p(x)` in expectation (Jensen), unbiased for :math:`p(x)`.

Writes ``results.json``, ``reconstructions_d{d}.png`` and ``samples_d{d}.png`` to ``--out``.

Usage::

    python examples/vae_digits.py --out out/vae_digits
    python examples/vae_digits.py --smoke --out /tmp/vae
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import eqx_module
from sklearn.datasets import load_digits

import emdppl
from emdppl.samplers import get_sampler
from emdppl.svi import default_optimizer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HIDDEN = 200
BATCH = 100


def load_data() -> dict[str, np.ndarray]:
    """Binarised digits: ``{"train": (1000, 64), "validation": (350, 64), "test": (447, 64)}``."""
    x = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    return {"train": x[:1000], "validation": x[1000:1350], "test": x[1350:]}


def networks(latent_dim: int, *, key: jax.Array) -> tuple[eqx.nn.MLP, eqx.nn.MLP]:
    """Encoder ``x (64,) -> (mu, log sigma) (2d,)`` and decoder ``z (d,) -> logits (64,)``."""
    enc_key, dec_key = jax.random.split(key)
    encoder = eqx.nn.MLP(64, 2 * latent_dim, HIDDEN, 1, activation=jnp.tanh, key=enc_key)
    decoder = eqx.nn.MLP(latent_dim, 64, HIDDEN, 1, activation=jnp.tanh, key=dec_key)
    return encoder, decoder


def log_joint(decoder: eqx.Module, x: jax.Array, z: jax.Array) -> jax.Array:
    r""":math:`\log N(z; 0, I) + \log \mathrm{Bernoulli}(x; \mathrm{sigmoid}(g(z)))`, one image:
    ``x`` (64,), ``z`` (d,)."""
    log_prior = jnp.sum(jax.scipy.stats.norm.logpdf(z))
    logits = decoder(z)
    return log_prior + jnp.sum(x * logits - jnp.logaddexp(0.0, logits))


def encode(encoder: eqx.Module, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(loc, scale)`` of q(z|x), each (d,), for one image ``x`` (64,)."""
    loc, log_scale = jnp.split(encoder(x), 2)
    return loc, jnp.exp(log_scale)


def vae(encoder_net: eqx.Module, decoder_net: eqx.Module, latent_dim: int):
    """NumPyro model and amortised guide; ``x`` (N, 64) is subsampled by the plate."""

    def model(x):
        decoder = eqx_module("decoder", decoder_net)
        with numpyro.plate("data", x.shape[0], subsample_size=BATCH) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([latent_dim]).to_event(1))
            logits = jax.vmap(decoder)(z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[idx])

    def guide(x):
        encoder = eqx_module("encoder", encoder_net)
        with numpyro.plate("data", x.shape[0], subsample_size=BATCH) as idx:
            loc, scale = jax.vmap(lambda xi: encode(encoder, xi))(x[idx])
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def fitted(net: eqx.Module, params: dict, name: str) -> eqx.Module:
    """The network ``net`` with the parameters SVI fitted under ``eqx_module(name, ...)``."""
    return eqx.combine(params[f"{name}$params"], eqx.partition(net, eqx.is_inexact_array)[1])


# ---------------------------------------------------------------------------------- evaluation


@eqx.filter_jit
def test_elbo(key: jax.Array, encoder, decoder, x: jax.Array, num_samples: int = 100):
    """Per-image ELBO, ``(N,)``, each averaged over ``num_samples`` encoder draws."""

    def one(key, xi):
        loc, scale = encode(encoder, xi)
        z = loc + scale * jax.random.normal(key, (num_samples, loc.size))
        log_q = jnp.sum(jax.scipy.stats.norm.logpdf(z, loc, scale), -1)
        return jnp.mean(jax.vmap(lambda zk: log_joint(decoder, xi, zk))(z) - log_q)

    return jax.lax.map(lambda a: one(*a), (jax.random.split(key, x.shape[0]), x))


@eqx.filter_jit
def is_log_likelihood(key, decoder, x, loc, scale, num_samples: int, prior_weight: float):
    r"""Per-image :math:`\log \frac1K \sum_k p(x, z_k) / q(z_k)`, ``(N,)``, with the proposal
    :math:`q = (1 - w) N(loc, scale^2) + w N(0, I)`; ``x`` (N, 64), ``loc``, ``scale`` (N, d)."""

    def one(key, xi, m, s):
        pick_key, normal_key = jax.random.split(key)
        eps = jax.random.normal(normal_key, (num_samples, m.size))
        from_prior = jax.random.uniform(pick_key, (num_samples, 1)) < prior_weight
        z = jnp.where(from_prior, eps, m + s * eps)
        log_q_gauss = jnp.sum(jax.scipy.stats.norm.logpdf(z, m, s), -1)
        log_prior = jnp.sum(jax.scipy.stats.norm.logpdf(z), -1)
        log_q = jnp.logaddexp(
            jnp.log1p(-prior_weight) + log_q_gauss,
            jnp.log(prior_weight) + log_prior if prior_weight > 0 else -jnp.inf,
        )
        log_w = jax.vmap(lambda zk: log_joint(decoder, xi, zk))(z) - log_q
        return jax.scipy.special.logsumexp(log_w) - jnp.log(num_samples)

    keys = jax.random.split(key, x.shape[0])
    return jax.lax.map(lambda a: one(*a), (keys, x, loc, scale))


# ---------------------------------------------------------------------------- MCEM with HMC


def hmc_sweep(key, decoder, x, z, log_step_size, num_steps: int, num_leapfrog: int):
    r"""``num_steps`` HMC steps of every image's latent chain under the current decoder.

    ``x`` (B, 64), ``z`` (B, d), ``log_step_size`` (B,). The blackjax state is built anew from
    ``z`` (it caches the log density of the old decoder). The step size moves towards 90%
    acceptance (AEVB App. E). Returns ``(z, log_step_size, draws (num_steps, B, d),
    acceptance (B,))``.
    """
    sampler = get_sampler("hmc")
    kernel = sampler.build_kernel(sampler.options(num_integration_steps=num_leapfrog))

    def one_image(key, xi, zi, log_eps):
        logdensity_fn = lambda zz: log_joint(decoder, xi, zz)
        state = sampler.init(zi, logdensity_fn, key)

        def step(carry, step_key):
            state, log_eps = carry
            params = {"step_size": jnp.exp(log_eps), "inverse_mass_matrix": jnp.ones(zi.size)}
            state, info = kernel(step_key, state, logdensity_fn, params)
            log_eps = log_eps + 0.1 * (info.acceptance_rate - 0.9)
            return (state, log_eps), (state.position, info.acceptance_rate)

        (state, log_eps), (draws, acc) = jax.lax.scan(
            step, (state, log_eps), jax.random.split(key, num_steps)
        )
        return state.position, log_eps, draws, jnp.mean(acc)

    keys = jax.random.split(key, x.shape[0])
    z, log_step_size, draws, acc = jax.vmap(one_image)(keys, x, z, log_step_size)
    return z, log_step_size, jnp.swapaxes(draws, 0, 1), acc


class MCEMState(NamedTuple):
    """Decoder parameters, Adam state, persistent latents ``z`` (N, d) and log step sizes (N,)."""

    params: eqx.Module
    opt_state: optax.OptState
    z: jax.Array
    log_step_size: jax.Array


class MCEMStep(eqx.Module):
    """``step(rng_key, state)``: HMC E-step on a minibatch's chains, one Adam M-step."""

    static: eqx.Module
    x: jax.Array
    optimizer: optax.GradientTransformation
    num_hmc: int = eqx.field(static=True)
    num_leapfrog: int = eqx.field(static=True)

    def __call__(self, rng_key, state: MCEMState) -> tuple[MCEMState, dict]:
        batch_key, hmc_key = jax.random.split(rng_key)
        idx = jax.random.choice(batch_key, self.x.shape[0], (BATCH,), replace=False)
        x = self.x[idx]
        decoder = eqx.combine(state.params, self.static)
        z, log_eps, _, acc = hmc_sweep(
            hmc_key,
            decoder,
            x,
            state.z[idx],
            state.log_step_size[idx],
            self.num_hmc,
            self.num_leapfrog,
        )

        def loss_fn(params):
            dec = eqx.combine(params, self.static)
            return -jnp.mean(jax.vmap(lambda xi, zi: log_joint(dec, xi, zi))(x, z))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = MCEMState(
            params, opt_state, state.z.at[idx].set(z), state.log_step_size.at[idx].set(log_eps)
        )
        return new, {"loss": loss, "acceptance_rate": jnp.mean(acc)}


def mcem_algorithm(decoder_net, x, optimizer, num_hmc: int, num_leapfrog: int):
    """MCEM as an ``emdppl.Algorithm``; ``init(z0 (N, d), rng_key)``."""
    params, static = eqx.partition(decoder_net, eqx.is_inexact_array)

    def init(z0, rng_key):
        del rng_key
        return MCEMState(params, optimizer.init(params), z0, jnp.full(z0.shape[0], jnp.log(0.1)))

    step = MCEMStep(static, jnp.asarray(x), optimizer, num_hmc, num_leapfrog)
    return emdppl.Algorithm(init, step)


@eqx.filter_jit
def posterior_proposal(key, decoder, x, latent_dim: int, num_steps: int):
    """Mean and sd (each (N, d)) of the second half of HMC chains on each image's posterior."""
    z_key, hmc_key = jax.random.split(key)
    z0 = jax.random.normal(z_key, (x.shape[0], latent_dim))
    log_eps = jnp.full(x.shape[0], jnp.log(0.1))
    _, _, draws, _ = hmc_sweep(hmc_key, decoder, x, z0, log_eps, num_steps, 10)
    kept = draws[num_steps // 2 :]
    return kept.mean(0), kept.std(0)


# ------------------------------------------------------------------------------------- plots


def save_grid(images: np.ndarray, path: Path, title: str, rows: int) -> None:
    cols = images.shape[0] // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4))
    for ax, im in zip(axes.ravel(), images, strict=True):
        ax.imshow(im.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def run_latent_dim(args, data: dict, latent_dim: int, key: jax.Array) -> dict:
    net_key, svi_key, eval_key, mcem_key, plot_key = jax.random.split(key, 5)
    encoder_net, decoder_net = networks(latent_dim, key=net_key)
    model, guide = vae(encoder_net, decoder_net, latent_dim)
    svi = emdppl.SVI(
        guide, optimizer=default_optimizer(args.num_steps, 3e-3), num_steps=args.num_steps
    )
    start = time.perf_counter()
    result = svi.fit(
        svi_key,
        model,
        model_args=(jnp.asarray(data["train"]),),
        auxiliary=False,
        progress_bar=not args.smoke,
    )
    encoder = fitted(encoder_net, result.params, "encoder")
    decoder = fitted(decoder_net, result.params, "decoder")
    k1, k2, k3, k4 = jax.random.split(eval_key, 4)
    x_test, x_val = jnp.asarray(data["test"]), jnp.asarray(data["validation"])
    loc, scale = jax.vmap(lambda xi: encode(encoder, xi))(x_test)
    out = {
        "latent_dim": latent_dim,
        "aevb_seconds": time.perf_counter() - start,
        "aevb_validation_elbo": float(jnp.mean(test_elbo(k1, encoder, decoder, x_val))),
        "aevb_test_elbo": float(jnp.mean(test_elbo(k2, encoder, decoder, x_test))),
        "aevb_test_is_loglik": float(
            jnp.mean(is_log_likelihood(k3, decoder, x_test, loc, scale, args.num_is_samples, 0.0))
        ),
    }

    start = time.perf_counter()
    mcem = mcem_algorithm(
        networks(latent_dim, key=net_key)[1],
        data["train"],
        optax.adam(optax.cosine_decay_schedule(3e-3, args.num_steps, 0.1)),
        2,
        5,
    )
    z0 = jax.random.normal(mcem_key, (data["train"].shape[0], latent_dim))
    state, trace = emdppl.run(
        mcem_key,
        mcem,
        args.num_steps,
        mcem.init(z0, mcem_key),
        progress_bar=not args.smoke,
        desc="mcem",
    )
    mcem_decoder = eqx.combine(state.params, mcem.step.static)
    m, s = posterior_proposal(k4, mcem_decoder, x_test, latent_dim, args.num_eval_hmc)
    out["mcem_acceptance_rate"] = float(np.mean(trace["acceptance_rate"][-100:]))
    out["mcem_test_is_loglik"] = float(
        jnp.mean(is_log_likelihood(k4, mcem_decoder, x_test, m, 1.2 * s, args.num_is_samples, 0.1))
    )
    out["mcem_seconds"] = time.perf_counter() - start

    recon = jax.nn.sigmoid(jax.vmap(decoder)(loc[:10]))
    save_grid(
        np.concatenate([data["test"][:10], np.asarray(recon)]),
        args.out / f"reconstructions_d{latent_dim}.png",
        f"test digits (top) and AEVB reconstructions (bottom), d={latent_dim}",
        rows=2,
    )
    z = jax.random.normal(plot_key, (20, latent_dim))
    samples = np.concatenate(
        [jax.nn.sigmoid(jax.vmap(decoder)(z)), jax.nn.sigmoid(jax.vmap(mcem_decoder)(z))]
    )
    save_grid(
        samples,
        args.out / f"samples_d{latent_dim}.png",
        f"decoder means at prior draws: AEVB (rows 1-2), MCEM (rows 3-4), d={latent_dim}",
        rows=4,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=4000, help="SVI and MCEM steps")
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--num-is-samples", type=int, default=1000)
    parser.add_argument("--num-eval-hmc", type=int, default=200, help="HMC steps per test image")
    parser.add_argument("--smoke", action="store_true", help="a few hundred steps, d = 2 only")
    parser.add_argument("--out", type=Path, default=Path("out/vae_digits"))
    args = parser.parse_args()
    if args.num_is_samples < 1000:
        parser.error("--num-is-samples must be >= 1000")
    if args.smoke:
        args.num_steps, args.latent_dims, args.num_eval_hmc = 300, [2], 40
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_data()
    keys = jax.random.split(jax.random.key(args.seed), len(args.latent_dims))
    results = [
        run_latent_dim(args, data, d, k) for d, k in zip(args.latent_dims, keys, strict=True)
    ]
    print(
        f"{'d':>3} {'AEVB test ELBO':>15} {'AEVB IS log p':>14} {'MCEM IS log p':>14}  (nats/image)"
    )
    for r in results:
        print(
            f"{r['latent_dim']:>3} {r['aevb_test_elbo']:>15.2f} {r['aevb_test_is_loglik']:>14.2f} "
            f"{r['mcem_test_is_loglik']:>14.2f}"
        )
    with open(args.out / "results.json", "w") as f:
        json.dump(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, f, indent=2
        )


if __name__ == "__main__":
    main()
