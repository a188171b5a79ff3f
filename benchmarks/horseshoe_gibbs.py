r"""A gold standard for :func:`benchmarks.models.horseshoe_regression`: the exact auxiliary-variable
Gibbs sampler of Makalic & Schmidt (2016, "A simple sampler for the horseshoe estimator").

NUTS does not give a trustworthy reference for this posterior (divergences at every
``target_accept`` up to 0.99: the funnels of ``tau * lambdas``). The model's conditionals are
conjugate once each half-Cauchy is written as an inverse-gamma scale mixture,
:math:`\lambda^2 \mid \nu \sim \mathrm{IG}(1/2, 1/\nu)`, :math:`\nu \sim \mathrm{IG}(1/2, 1)`.
With :math:`\beta = \tau\lambda\tilde\beta` (so :math:`\beta_j \sim N(0, \tau^2\lambda_j^2)`)
and the observation precision :math:`\phi \sim \mathrm{Gamma}(3, 1)`, one sweep draws

.. math::

    \beta &\sim N(A^{-1}\phi X^T y,\ A^{-1}), \quad
        A = \phi X^T X + \mathrm{diag}(\tau^{-2}\lambda^{-2}) \\
    \phi &\sim \mathrm{Gamma}(3 + N/2,\ 1 + \lVert y - X\beta\rVert^2 / 2) \\
    \lambda_j^2 &\sim \mathrm{IG}(1,\ 1/\nu_j + \beta_j^2 / (2\tau^2)), \quad
    \nu_j \sim \mathrm{IG}(1,\ 1 + 1/\lambda_j^2) \\
    \tau^2 &\sim \mathrm{IG}((p + 1)/2,\ 1/\xi + \textstyle\sum_j \beta_j^2 / (2\lambda_j^2)), \quad
    \xi \sim \mathrm{IG}(1,\ 1 + 1/\tau^2)

every chain at once (float64 NumPy, chains batched). The draws are returned in the model's own
sites: ``lambdas`` (p,), ``tau`` (1,), ``unscaled_betas = beta / (tau lambdas)`` (p,) and
``prec_obs``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["horseshoe_gibbs", "initial_state", "model_sites", "sweep"]


def _inverse_gamma(rng: np.random.Generator, shape: float, scale: np.ndarray) -> np.ndarray:
    """One draw of IG(shape, scale) per element of ``scale``: ``scale / Gamma(shape, 1)``."""
    return scale / rng.gamma(shape, size=np.shape(scale))


def horseshoe_gibbs(
    X: np.ndarray,  # noqa: N803 (the model's names)
    Y: np.ndarray,  # noqa: N803
    *,
    seed: int = 0,
    num_chains: int = 8,
    num_warmup: int = 5000,
    num_samples: int = 20000,
    thin: int = 4,
) -> dict[str, np.ndarray]:
    """Posterior draws ``{site: (num_chains, num_samples // thin, ...)}`` of the horseshoe.

    ``X`` (N, p) and ``Y`` (N,) as for :func:`benchmarks.models.horseshoe_regression`; chains
    start from independent prior draws of the scales (:func:`initial_state`).
    """
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    rng = np.random.default_rng(seed)
    state = initial_state(rng, num_chains, x.shape[1])
    keep = []
    for it in range(num_warmup + num_samples):
        state = sweep(rng, state, x, y)
        if it >= num_warmup and (it - num_warmup) % thin == 0:
            keep.append(state)
    return model_sites(*(np.stack(v, axis=1) for v in zip(*keep, strict=True)))


def initial_state(rng: np.random.Generator, num_chains: int, num_features: int) -> tuple:
    """``(beta, lam2, nu, tau2, xi, phi)``, shapes ``(c, p), (c, p), (c, p), (c,), (c,), (c,)``:
    the scales drawn from their half-Cauchy priors, ``beta`` zero, the auxiliaries one."""
    c, p = num_chains, num_features
    lam2 = np.abs(rng.standard_cauchy((c, p))) ** 2
    tau2 = np.abs(rng.standard_cauchy(c)) ** 2
    return np.zeros((c, p)), lam2, np.ones((c, p)), tau2, np.ones(c), np.ones(c)


def sweep(rng: np.random.Generator, state: tuple, x: np.ndarray, y: np.ndarray) -> tuple:
    """One Gibbs sweep of every chain; ``y`` is ``(N,)`` (shared) or ``(c, N)`` (per chain)."""
    _, lam2, nu, tau2, xi, phi = state
    n, p = x.shape
    prior_prec = 1.0 / np.clip(tau2[:, None] * lam2, 1e-300, None)
    a = phi[:, None, None] * (x.T @ x) + prior_prec[:, :, None] * np.eye(p)
    chol = np.linalg.cholesky(a)
    mean = np.linalg.solve(a, (phi[:, None] * (y @ x))[..., None])[..., 0]
    white = rng.standard_normal((len(phi), p, 1))
    beta = mean + np.linalg.solve(np.swapaxes(chol, 1, 2), white)[..., 0]
    resid = y - beta @ x.T
    phi = rng.gamma(3.0 + n / 2, size=phi.shape) / (1.0 + 0.5 * np.sum(resid**2, axis=1))
    lam2 = _inverse_gamma(rng, 1.0, 1.0 / nu + beta**2 / (2 * tau2[:, None]))
    nu = _inverse_gamma(rng, 1.0, 1.0 + 1.0 / lam2)
    tau2 = _inverse_gamma(rng, (p + 1) / 2, 1.0 / xi + np.sum(beta**2 / (2 * lam2), axis=1))
    xi = _inverse_gamma(rng, 1.0, 1.0 + 1.0 / tau2)
    return beta, lam2, nu, tau2, xi, phi


def model_sites(beta, lam2, _nu, tau2, _xi, phi) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The state in the model's sites: ``lambdas``, ``tau`` (..., 1), ``unscaled_betas``,
    ``prec_obs``."""
    lambdas, tau = np.sqrt(lam2), np.sqrt(tau2)[..., None]
    return {
        "lambdas": lambdas,
        "tau": tau,
        "unscaled_betas": beta / (tau * lambdas),
        "prec_obs": phi,
    }
