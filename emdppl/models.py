"""Small, well-known NumPyro models with their data, embedded for the demo, tests and docs.

Each is written centered, the way people write it; :func:`emdppl.auxiliary` non-centers it.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["EIGHT_SCHOOLS", "eight_schools"]

#: Rubin (1981): estimated coaching effects ``y`` and their standard errors ``sigma``.
EIGHT_SCHOOLS = {
    "y": np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]),
    "sigma": np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]),
}


def eight_schools(sigma: np.ndarray, y: np.ndarray | None = None) -> None:
    r"""Eight schools, centered (posteriordb's priors).

    :math:`\mu \sim N(0, 5)`, :math:`\tau \sim \mathrm{HalfCauchy}(5)`,
    :math:`\theta_j \sim N(\mu, \tau)`, :math:`y_j \sim N(\theta_j, \sigma_j)`, ``sigma`` (J,),
    ``y`` (J,) or ``None`` to sample the prior predictive.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)
