"""emdppl: MCMC, SVI and EM distillation on NumPyro models in auxiliary form.

The public surface: :func:`auxiliary` / :func:`check_auxiliary` (the non-centered form),
:class:`Target` (a log density on unconstrained space), the sampler registry
(:func:`samplers`, :func:`register_sampler`), :class:`MCMC`, the driver :func:`run`,
:func:`infer` (one call, ArviZ out) and :func:`to_arviz`.
"""

from emdppl.base import Algorithm
from emdppl.infer import infer
from emdppl.inference_data import to_arviz
from emdppl.mcmc import MCMC, mcmc_algorithm
from emdppl.reparam import auxiliary, check_auxiliary
from emdppl.run import run
from emdppl.samplers import get_sampler, register_sampler, samplers
from emdppl.svi import SVI
from emdppl.target import Target

__version__ = "0.1.0"

__all__ = [
    "MCMC",
    "SVI",
    "Algorithm",
    "Target",
    "auxiliary",
    "check_auxiliary",
    "get_sampler",
    "infer",
    "mcmc_algorithm",
    "register_sampler",
    "run",
    "samplers",
    "to_arviz",
]
