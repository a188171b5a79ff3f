"""Unseen distillation problems: random Gaussian mixtures, their teachers and mode-coverage metrics.

A problem is drawn from a seed alone (``numpy.random.default_rng(seed)``):

* ``num_modes`` in ``modes_range`` and ``data_dim`` in ``dim_range`` (uniform integers);
* weights ``w = w_min + (1 - K w_min) Dirichlet(alpha 1_K)``, so the lightest is at least
  ``w_min`` (0.02) and the rest is as uneven as a flat Dirichlet makes it;
* per-component, per-coordinate scales ``s_kj`` log-uniform on ``[0.5, 2] s_0`` (anisotropic);
* means placed by rejection in a cube that grows until they fit, every pair at least
  ``separation`` (6) times the larger of the two components' largest scales apart.

The teacher is :class:`emdppl.teachers.GaussianMixture` (exact diffused score at every sigma) or,
where affordable, a diffusion model trained on its samples (:func:`trained_teacher`).

Metrics (:func:`mode_metrics`) assign each draw to its nearest mode by Mahalanobis distance
under the (optionally diffused) component scales: TV of the mode masses against the weights,
the lightest mode's mass over its weight, and the off-mode fraction (squared Mahalanobis distance
to the nearest mode above the chi-square 0.999 quantile; 0.1% for exact draws).

Seeds: tests use :data:`TEST_SEEDS`; defaults are tuned on :data:`TUNE_SEEDS` and checked on
:data:`HELDOUT_SEEDS` (no test uses those two ranges).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from emdppl import teachers
from emdppl.distill_config import cosine_adam

__all__ = [
    "HELDOUT_SEEDS",
    "TEST_SEEDS",
    "TUNE_SEEDS",
    "MixtureProblem",
    "assign_modes",
    "generator_optimizer",
    "mode_metrics",
    "random_mixture",
    "trained_teacher",
]

TEST_SEEDS = (0, 1, 2)
TUNE_SEEDS = tuple(range(100, 106))
HELDOUT_SEEDS = tuple(range(200, 212))
#: squared Mahalanobis distance quantile beyond which a draw is "off-mode"
OFF_MODE_QUANTILE = 0.999


@dataclasses.dataclass(frozen=True)
class MixtureProblem:
    """A random mixture: ``locs (K, d)``, ``scales (K, d)``, ``weights (K,)``, its ``seed``."""

    locs: np.ndarray
    scales: np.ndarray
    weights: np.ndarray
    seed: int

    @property
    def num_modes(self) -> int:
        return self.locs.shape[0]

    @property
    def data_dim(self) -> int:
        return self.locs.shape[1]

    def teacher(self) -> teachers.GaussianMixture:
        """The exact teacher :math:`\\sum_k w_k N(\\mu_k, \\mathrm{diag}(s_k^2))`."""
        return teachers.GaussianMixture(self.locs, self.scales, self.weights)

    def describe(self) -> str:
        return (
            f"seed {self.seed}: {self.num_modes} modes in {self.data_dim}-D, weights "
            f"{self.weights.min():.3f}-{self.weights.max():.3f}"
        )


def random_mixture(
    seed: int,
    *,
    modes_range: tuple[int, int] = (4, 25),
    dim_range: tuple[int, int] = (2, 10),
    min_weight: float = 0.02,
    alpha: float = 1.0,
    scale: float = 1.0,
    separation: float = 6.0,
) -> MixtureProblem:
    """The mixture drawn from ``seed`` (ranges inclusive); see the module docstring."""
    if not 1 <= modes_range[0] <= modes_range[1] or not 1 <= dim_range[0] <= dim_range[1]:
        raise ValueError(f"bad ranges {modes_range}, {dim_range}.")
    if modes_range[1] * min_weight >= 1:
        raise ValueError(f"min_weight {min_weight} x {modes_range[1]} modes must be < 1.")
    rng = np.random.default_rng(seed)
    k = int(rng.integers(modes_range[0], modes_range[1] + 1))
    d = int(rng.integers(dim_range[0], dim_range[1] + 1))
    weights = min_weight + (1 - k * min_weight) * rng.dirichlet(np.full(k, alpha))
    scales = scale * np.exp(rng.uniform(np.log(0.5), np.log(2.0), (k, d)))
    reach = scales.max(axis=1)
    side = separation * reach.max() * k ** (1 / d)
    locs = np.zeros((k, d))
    placed = 0
    while placed < k:
        for _ in range(200):
            candidate = rng.uniform(-side / 2, side / 2, d)
            gaps = np.linalg.norm(locs[:placed] - candidate, axis=1)
            if np.all(gaps >= separation * np.maximum(reach[:placed], reach[placed])):
                locs[placed] = candidate
                placed += 1
                break
        else:
            side *= 1.2  # crowded: widen the cube and keep what is placed
    return MixtureProblem(locs, scales, weights / weights.sum(), int(seed))


def assign_modes(x: np.ndarray, problem: MixtureProblem, sigma: float = 0.0):
    """``(mode (n,), squared Mahalanobis distance (n,))`` of draws ``x (n, d)`` to the nearest
    component of ``problem`` diffused to noise ``sigma`` (scales ``sqrt(s^2 + sigma^2)``)."""
    var = problem.scales**2 + sigma**2
    d2 = jnp.sum((jnp.asarray(x)[:, None, :] - problem.locs[None]) ** 2 / var[None], axis=-1)
    mode = jnp.argmin(d2, axis=1)
    return np.asarray(mode), np.asarray(jnp.min(d2, axis=1))


def mode_metrics(
    x: np.ndarray, problem: MixtureProblem, sigma: float = 0.0, target: np.ndarray | None = None
) -> dict:
    """Mode coverage of draws ``x (n, d)``: ``tv`` (total variation between mode masses and
    ``target``, default the weights), ``lightest_ratio`` (mass / weight of the lightest mode),
    ``off_mode`` (fraction beyond the chi-square 0.999 quantile), ``masses (K,)``. Non-finite
    draws count as off-mode and belong to no mode."""
    x = np.asarray(x)
    finite = np.all(np.isfinite(x), axis=1)
    mode, d2 = assign_modes(np.where(finite[:, None], x, 0.0), problem, sigma)
    masses = np.bincount(mode[finite], minlength=problem.num_modes) / x.shape[0]
    target = problem.weights if target is None else np.asarray(target)
    lightest = int(np.argmin(problem.weights))
    off = (~finite) | (d2 > stats.chi2.ppf(OFF_MODE_QUANTILE, problem.data_dim))
    return {
        "tv": float(0.5 * np.abs(masses - target).sum()),
        "lightest_ratio": float(masses[lightest] / problem.weights[lightest]),
        "off_mode": float(off.mean()),
        "masses": masses.tolist(),
    }


def trained_teacher(
    problem: MixtureProblem, rng_key: int, num_samples: int = 20_000, num_steps: int = 3000
) -> teachers.DiffusionModel:
    """A diffusion teacher trained on ``num_samples`` exact draws of ``problem``
    (:func:`emdppl.teachers.train_diffusion`, default EDM network)."""
    k_data, k_train = jax.random.split(jax.random.key(rng_key))
    data = problem.teacher().sample(k_data, num_samples)
    return teachers.train_diffusion(
        data, rng_key=k_train, num_steps=num_steps, progress_bar=False
    )


def generator_optimizer(learning_rate: float | None, num_steps: int) -> dict:
    """The distill option for the generator's optimiser of the mixture benchmarks: ``{}`` (the
    library's default) for ``None``, else ``cosine_adam(learning_rate, num_steps,
    max_grad_norm=1.0)``."""
    if learning_rate is None:
        return {}
    return {"optimizer": cosine_adam(learning_rate, num_steps, max_grad_norm=1.0)}
