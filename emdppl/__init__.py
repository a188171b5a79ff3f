"""emdppl: MCMC, SVI and EM distillation on NumPyro (and Pyro) models in auxiliary form.

The public surface: :func:`auxiliary` / :func:`check_auxiliary` (the non-centered form),
:class:`Target` (a log density on unconstrained space), the sampler registry
(:func:`samplers`, :func:`register_sampler`), :class:`MCMC`, the driver :func:`run`,
:func:`infer` (one call, ArviZ out) and :func:`to_arviz`; :class:`SVI`; EM distillation
(:func:`distill`, :class:`EMD`, :mod:`emdppl.teachers`, :mod:`emdppl.generators`).
"""

from emdppl import generators, teachers
from emdppl.base import Algorithm
from emdppl.emd import EMD, DistillResult, distill
from emdppl.infer import infer
from emdppl.inference_data import to_arviz
from emdppl.mcmc import MCMC, mcmc_algorithm
from emdppl.reparam import auxiliary, check_auxiliary
from emdppl.driver import run
from emdppl.samplers import get_sampler, register_sampler, samplers
from emdppl.svi import SVI
from emdppl.target import Target

__version__ = "0.1.0"

__all__ = [
    "EMD",
    "MCMC",
    "SVI",
    "Algorithm",
    "DistillResult",
    "Target",
    "auxiliary",
    "check_auxiliary",
    "distill",
    "generators",
    "get_sampler",
    "infer",
    "mcmc_algorithm",
    "register_sampler",
    "run",
    "samplers",
    "teachers",
    "to_arviz",
]
