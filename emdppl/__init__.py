"""emdppl: MCMC, SVI and EM distillation on NumPyro (and Pyro) models in auxiliary form.

The public surface: :func:`auxiliary` / :func:`check_auxiliary` (the non-centered form),
:class:`Problem` and :class:`Target` (a model, and its log density on unconstrained space), the
sampler registry (:func:`samplers`, :func:`register_sampler`), :class:`MCMC`, the driver
:func:`run`, :func:`infer` (one call, ArviZ out) and :func:`to_arviz`; :class:`SVI`; EM
distillation (:func:`distill`, :class:`DistillConfig`, :class:`EMD`, :mod:`emdppl.emd`,
:mod:`emdppl.teachers`, :mod:`emdppl.generators`).

Layout, lower layers first (a module imports only from the lines above it):

- ``base``: ``Algorithm(init, step)``, PRNG keys, pytree helpers.
- ``timing``: wall and compile seconds (JAX monitoring events).
- ``sharding``: chains and distillation batches over devices (``"chain"`` / ``"batch"`` mesh
  axes, data and parameters replicated).
- ``distributed``: several processes as one JAX runtime (``jax.distributed``).
- ``curvature``: Hessians (also of a host log density, by gradient differences) and the
  marginal sds of a Laplace approximation.
- ``datasets``: sklearn's bundled 8x8 digits, split with a seed.
- ``diagnostics``: what Stan checks after a run (R-hat, ESS, divergences, E-BFMI, tree depth,
  step size, non-finite draws), one warning naming the sites and the fix.
- ``driver``: :func:`run`, any Algorithm in jitted ``lax.scan`` chunks; checkpoints, resume.
- ``initialization``: the optimisation-based start of MCMC chains (L-BFGS, chain by chain).
- ``kernels/mala``, ``kernels/ula``: preconditioned MALA and the unadjusted Langevin kernel, in
  blackjax's shape.
- ``samplers``: the one sampler registry over blackjax kernels, and their warm-ups.
- ``reparam``: the auxiliary form (one reparam family table for NumPyro and Pyro).
- ``target``: :class:`Target`, a NumPyro model's log density and postprocessing.
- ``predictive``: a NumPyro model's sites, plate dims, pointwise log likelihood and
  predictive draws (its Pyro twin: ``bridge/pyro_predictive``).
- ``problem``: :class:`Problem`, a model (NumPyro, Pyro or a Target) and its arguments; the
  only module that tells backends apart.
- ``inference_data``: the one adapter to ArviZ, and the one place an algorithm's result gets
  the model's groups (:func:`~emdppl.inference_data.add_model_groups`).
- ``mcmc``, ``svi``: MCMC over many chains; SVI (AEVB), both as Algorithms with settings.
- ``schedule``: the VE/EDM noise schedule and the teachers' ODE samplers.
- ``losses``: denoising score matching, the M-step surrogate, its weighting.
- ``teachers``, ``generators``: scores to distil; one-step generators.
- ``networks``, ``image_metrics``: an image denoiser network; FID, precision/recall and class
  coverage by a digits classifier trained here.
- ``distill_config``: :class:`DistillConfig`, every distillation setting, validated and frozen.
- ``estep``: the E-step chains over the generator's latents, pure functions.
- ``emd``: EM distillation as ``init`` / ``build_kernel`` / ``as_top_level_api``.
- ``distillation``: the driver :func:`distill`, :class:`DistillResult`, :class:`EMD`,
  :class:`EMDResult`.
- ``infer``: :func:`infer`, one call for every algorithm.
- ``bridge/``: torch and Pyro, imported lazily (callback, aten lowering to JAX, torch teacher,
  Pyro model, target, predictive, SVI).
- ``models``, ``digits``, ``demo``, ``cli``: the bundled eight schools, the digits
  distillation experiment, ``emdppl demo``, the command line.
"""

from emdppl.distributed import initialize_from_environment

initialize_from_environment()  # EMDPPL_COORDINATOR set: join before a JAX backend starts

from emdppl import bridge, distributed, emd, generators, sharding, teachers
from emdppl.base import Algorithm
from emdppl.distill_config import DistillConfig
from emdppl.distillation import EMD, DistillResult, EMDResult, distill
from emdppl.driver import run
from emdppl.infer import infer
from emdppl.inference_data import to_arviz
from emdppl.mcmc import MCMC, mcmc_algorithm
from emdppl.problem import Problem
from emdppl.reparam import auxiliary, check_auxiliary
from emdppl.samplers import get_sampler, register_sampler, samplers
from emdppl.svi import SVI
from emdppl.target import Target

__version__ = "0.1.0"

__all__ = [
    "EMD",
    "MCMC",
    "SVI",
    "Algorithm",
    "DistillConfig",
    "DistillResult",
    "EMDResult",
    "Problem",
    "Target",
    "auxiliary",
    "bridge",
    "check_auxiliary",
    "distill",
    "distributed",
    "emd",
    "generators",
    "get_sampler",
    "infer",
    "mcmc_algorithm",
    "register_sampler",
    "run",
    "samplers",
    "sharding",
    "teachers",
    "to_arviz",
]
