r"""The distillation driver: :func:`distill`, its :class:`DistillResult`, and :class:`EMD`, a
model's posterior distilled into a one-step generator through :func:`emdppl.infer`.

:func:`distill` builds the algorithm of :mod:`emdppl.emd` from a
:class:`~emdppl.distill_config.DistillConfig`, warms up the student, runs it with
:func:`emdppl.run` (progress bar, checkpoints, resume), checks the run (NaN stop, z drift) and
probes E-step chains at the final parameters for ArviZ diagnostics. With ``devices=`` each
step's batch is split over a ``"batch"`` mesh axis (:mod:`emdppl.sharding`), the parameters
replicated; the results have the same layout as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from emdppl import emd
from emdppl import generators as generators_module
from emdppl.base import PRNGKey, as_key, caller_stacklevel
from emdppl.distill_config import DistillConfig, cosine_adam
from emdppl.driver import check_checkpoint_dir, checkpoint_exists, run
from emdppl.estep import run_chain
from emdppl.sharding import Devices, batch_mesh, describe, to_host
from emdppl.teachers import (
    NUM_LAPLACE_STARTS,
    SMOOTHINGS,
    AbstractTeacher,
    DensityTeacher,
    DiffusionModel,
    density_teacher,
)

if TYPE_CHECKING:
    from emdppl.problem import Problem

__all__ = ["EMD", "DistillResult", "EMDResult", "OwnDensityStudent", "distill"]

GENERATORS = ("sinh_arcsinh", "maf", "affine", "mlp")
#: The generators with an exact density (all but ``"mlp"``).
DENSITY_GENERATORS = ("sinh_arcsinh", "maf", "affine")

#: ``z_rms`` (last tenth of the run, median) above which the z chains are called unstable
#: (values on working and failing runs: benchmarks/README.md, "z_rms").
MAX_Z_RMS = 1.5
#: Below this median acceptance (last tenth of the run) a Metropolis E-step warns.
MIN_ESTEP_ACCEPTANCE = 0.1


@eqx.filter_jit
def _probe(kernel, teacher, state: emd.EMDState, rng_key, sigmas, num_chains: int, num_draws: int):
    """E-step chains at the final parameters for each probe sigma: ``{"eps", "z"}`` with leaves
    ``(chain, draw, probe, ...)`` and the acceptance ``(chain, draw, probe)``."""
    num_probes = sigmas.shape[0]
    k_eps, k_z, k_chain = jax.random.split(rng_key, 3)
    eps0 = jax.random.normal(k_eps, (num_probes, num_chains, kernel.data_dim))
    z0 = jax.random.normal(k_z, (num_probes, num_chains, kernel.latent_dim))
    keys = jax.random.split(k_chain, (num_probes, num_chains))
    target = kernel.estep_target(teacher, state.theta, state.psi)

    def one(key, sigma, e, z):
        parameters = kernel.sampler_parameters
        return run_chain(key, kernel.config, target, sigma, e, z, num_draws, parameters, True)[1]

    per_chain = jax.vmap(one, in_axes=(0, None, 0, 0))
    trace = jax.vmap(per_chain, in_axes=(0, 0, 0, 0))(keys, sigmas, eps0, z0)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), trace)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _latents(rng_key: PRNGKey, n: int, latent_dim: int) -> jax.Array:
    """``z (n, latent_dim) ~ N(0, I)``."""
    return jax.random.normal(rng_key, (n, latent_dim))


@eqx.filter_jit
def _push(generator: generators_module.AbstractGenerator, z: jax.Array) -> jax.Array:
    return jax.vmap(generator)(z)


def _sample(generator: generators_module.AbstractGenerator, rng_key: PRNGKey, n: int):
    """``n`` one-step draws ``g(z)``, ``(n, d)``. The latents are drawn in a program of their
    own: XLA:CPU runs threefry and a small generator fused in one program about twice as slowly
    as the two apart (``benchmarks/README.md``, "Measurements behind defaults")."""
    return _push(generator, _latents(rng_key, n, generator.latent_dim))


@dataclasses.dataclass(frozen=True)
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes
    ----------
    generator
        The trained generator module.
    student
        The trained student score model (``None`` for a generator with ``marginal_score``).
    history
        ``{name: array (num_steps,)}`` of :class:`~emdppl.emd.EMDInfo` fields.
    estep_idata
        ArviZ data of E-step chains at the final ``theta``: posterior ``eps`` and ``z`` with dims
        ``(chain, draw, probe, ...)``, one probe per noise level in ``attrs["probe_sigmas"]``.
    state
        The final :class:`~emdppl.emd.EMDState`.
    config
        The :class:`~emdppl.distill_config.DistillConfig` of the run (noise range filled in).
    devices
        The devices the batch was split over (as strings; the default device without
        ``devices=``), also in ``estep_idata.posterior.attrs["devices"]``.
    """

    generator: Any
    student: Any
    history: dict
    estep_idata: Any
    state: emd.EMDState
    config: DistillConfig | None = None
    devices: tuple[str, ...] = ()

    def sample(self, rng_key: int | PRNGKey, n: int) -> jax.Array:
        """``n`` one-step draws ``g(z)`` of shape ``(n, d)`` (one network evaluation each)."""
        return _sample(self.generator, as_key(rng_key), int(n))


def _default_generator(teacher: AbstractTeacher, key: PRNGKey):
    if isinstance(teacher, DensityTeacher):
        return generators_module.sinh_arcsinh(teacher.data_dim)
    return generators_module.from_teacher(teacher, key=key)


def distill(
    teacher: AbstractTeacher,
    generator: generators_module.AbstractGenerator | None = None,
    *,
    config: DistillConfig | None = None,
    student: DiffusionModel | None = None,
    rng_key: int | PRNGKey = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
    devices: Devices = None,
    **options: Any,
) -> DistillResult:
    r"""Distil ``teacher`` into a one-step ``generator`` by EM distillation (or Diff-Instruct).

    Parameters
    ----------
    teacher
        An :class:`~emdppl.teachers.AbstractTeacher` (score on the VE schedule).
    generator
        An :class:`~emdppl.generators.AbstractGenerator`; default
        :func:`~emdppl.generators.from_teacher` (or :func:`~emdppl.generators.sinh_arcsinh` for a
        :class:`~emdppl.teachers.DensityTeacher`).
    config, **options
        A :class:`~emdppl.distill_config.DistillConfig`, and/or its fields as keywords
        (``method="diff_instruct"``, ``num_steps=``, ``num_estep_steps=``, ...), which replace
        those of ``config``.
    student
        Initial student score model; default :func:`emdppl.emd.default_student` (a copy of a
        :class:`~emdppl.teachers.DiffusionModel` teacher, else a fresh
        :class:`~emdppl.teachers.EDMNetwork`). Unused for generators with ``marginal_score``.
    rng_key
        Seed or key; every random number derives from it.
    checkpoint_dir
        Checkpoint after every chunk and resume from it (:func:`emdppl.run`); one process only,
        as for :class:`emdppl.MCMC` (several devices are fine).
    progress_bar
        Show progress.
    devices
        Where each step's batch runs (:func:`emdppl.sharding.batch_mesh`): ``None`` (the
        default device), ``"all"``, an int (the first ``n`` of ``jax.devices()``), a list of
        devices or a one-axis ``jax.sharding.Mesh``. The E-step chains and the student's DSM
        draws are split evenly over a ``"batch"`` mesh axis (``batch_size`` must be a multiple
        of the number of devices), the generator's and student's parameters and optimiser
        states replicated, their gradients all-reduced; the result is that of one device up to
        float round-off, and ``result.devices`` lists the devices.

    Returns
    -------
    DistillResult

    Examples
    --------
    >>> teacher = emdppl.teachers.GaussianMixture(locs, scales, weights)  # doctest: +SKIP
    >>> result = emdppl.distill(teacher, method="emd", rng_key=0)  # doctest: +SKIP
    >>> x = result.sample(jax.random.key(1), 10_000)  # doctest: +SKIP
    """
    config = DistillConfig.from_options(config, **options)
    mesh = batch_mesh(devices, config.batch_size)  # a bad spec fails here, before any tracing
    check_checkpoint_dir(checkpoint_dir)  # the student warm-up runs before emdppl.run does
    if not isinstance(teacher, AbstractTeacher):
        emd.check_inputs(teacher, generator, student, config)  # raises the TypeError
    config = config.for_teacher(teacher)
    k_build, k_warmup, k_run, k_probe = jax.random.split(as_key(rng_key), 4)
    k_generator, k_student = jax.random.split(k_build)
    if generator is None:
        generator = _default_generator(teacher, k_generator)
    if student is None and isinstance(generator, generators_module.AbstractGenerator):
        student = emd.default_student(teacher, generator, k_student)
    elif hasattr(generator, "marginal_score"):
        student = None  # the generator is its own (exact) student
    algorithm = emd.as_top_level_api(teacher, generator, student, config, devices=mesh)
    state = algorithm.init(generator, k_build)
    if (
        student is not None
        and config.student_warmup_steps
        and not checkpoint_exists(checkpoint_dir)
    ):
        state, _ = run(
            k_warmup,
            emd.student_warmup(config, generator, student, mesh),
            config.student_warmup_steps,
            state,
            progress_bar=progress_bar,
            desc="student warm-up",
        )
    state, trace = run(
        k_run,
        algorithm,
        config.num_steps,
        state,
        progress_bar=progress_bar,
        desc=f"distilling ({config.method})",
        checkpoint_dir=checkpoint_dir,
    )
    history = {name: np.asarray(value) for name, value in trace._asdict().items()}
    _check_stopped(state, config, checkpoint_dir, history, teacher)
    _warn_z_drift(history["z_rms"], config.update_z)
    _warn_low_acceptance(history["acceptance_rate"], config)
    kernel, devices = algorithm.step.kernel, tuple(describe(mesh))
    estep_idata = None
    if config.num_probe_draws:
        estep_idata = _probe_idata(kernel, algorithm.step.teacher, state, k_probe, devices)
    return DistillResult(
        eqx.combine(state.theta, kernel.generator_static),
        None if student is None else eqx.combine(state.psi, kernel.student_static),
        history,
        estep_idata,
        state,
        config,
        devices,
    )


def _check_stopped(
    state: emd.EMDState, config: DistillConfig, checkpoint_dir, history: dict, teacher
) -> None:
    if int(state.consecutive_skipped) < config.max_consecutive_nan:
        return
    where = f" and in the checkpoint in {checkpoint_dir}" if checkpoint_dir is not None else ""
    raise FloatingPointError(
        f"distillation stopped: {config.max_consecutive_nan} consecutive steps produced NaN/inf; "
        f"{int(state.num_skipped)} steps were skipped in all. The last finite parameters are "
        f"kept in the state{where}. {_stop_cause(history, config, teacher)}"
    )


def _stop_cause(history: dict, config: DistillConfig, teacher: Any = None) -> str:
    """What made the last run of skipped steps non-finite, read from ``history``
    (:class:`~emdppl.emd.EMDInfo` fields, ``(num_steps,)`` each), with the setting to change.

    The first step of that run is classified by the quantity that was not finite there: every
    E-step chain (the E-step diverged), the student's DSM loss, the M-step loss or gradient, or
    none of them (the optimiser's update overflowed the parameters)."""
    skipped = np.asarray(history["is_skipped"], bool)
    if not skipped.any():
        return ""
    first = len(skipped) - int(np.argmin(skipped[::-1])) if not skipped.all() else 0
    history = {name: np.asarray(value) for name, value in history.items()}
    row = {name: value[first] for name, value in history.items()}
    before = {name: value[max(0, first - 10) : first] for name, value in history.items()}
    at = f"At step {first} (the first of the run)"
    if row["nonfinite_chains"] < 0:  # resumed from a checkpoint that had already stopped
        return "The run was resumed from a checkpoint taken after it had stopped."
    if row["nonfinite_chains"] == config.batch_size:
        lead = before["nonfinite_chains"]
        trend = (
            f"; over the 10 steps before, {int(lead.min())}-{int(lead.max())} chains per step "
            "were already non-finite"
            if lead.size and lead.max() > 0
            else ""
        )
        message = (
            f"{at} every one of the {config.batch_size} E-step chains ended non-finite{trend}: "
            f"the E-step diverged. Lower estep_step_size (now {config.estep_step_size:g}) or "
            f"num_estep_steps (now {config.num_estep_steps})"
        )
        if config.update_z:
            message += (
                f", or z_step_scale / max_z_step (now {config.z_step_scale:g} / "
                f"{config.max_z_step:g}), or set update_z=False"
            )
        if getattr(teacher, "smoothing", None) == "laplace":
            message += (
                "; with smoothing='laplace' the usual cause is sigma_max above sqrt(3) times the "
                "posterior's smallest scale: use smoothing='none' (emdppl.EMD's default)"
            )
    elif not np.isfinite(row["student_loss"]):
        message = (
            f"{at} the student's denoising loss was {row['student_loss']}: the student diverged. "
            "Lower the student's learning rate (student_optimizer)"
        )
    elif not (np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])):
        message = (
            f"{at} the M-step loss was {row['loss']} and the gradient norm {row['grad_norm']} "
            f"with {config.batch_size - int(row['nonfinite_chains'])} finite E-step chains: the "
            "generator's output or its gradient overflows. Lower the learning rate "
            "(optimizer=, or emdppl.EMD(learning_rate=)) or clip the gradient "
            "(optax.clip_by_global_norm)"
        )
    else:
        message = (
            f"{at} the loss ({row['loss']:.4g}) and gradient norm ({row['grad_norm']:.4g}) were "
            "finite but the updated parameters were not: the optimiser's step overflowed them. "
            "Lower the learning rate (optimizer=, or emdppl.EMD(learning_rate=))"
        )
    norms = before["grad_norm"][np.isfinite(before["grad_norm"])]
    early = history["grad_norm"][: max(1, first // 10)]
    early = early[np.isfinite(early)]
    if norms.size and early.size and np.max(norms) > 100 * max(np.median(early), 1e-12):
        message += (
            f". The generator's gradient norm had grown from {np.median(early):.3g} (median over "
            f"the first tenth of the steps) to {np.max(norms):.3g} just before: the generator "
            "moved where the teacher is stiff; a lower learning rate keeps it from getting there"
        )
    return message + "."


def _warn_z_drift(z_rms: np.ndarray, update_z: bool) -> None:
    """Warn when the E-step's z chains ended far from N(0, I) over the last tenth of the run."""
    tail = z_rms[-max(1, len(z_rms) // 10) :]
    tail = tail[np.isfinite(tail)]
    if not update_z or tail.size == 0 or np.median(tail) <= MAX_Z_RMS:
        return
    warnings.warn(
        f"the E-step's z chains drift far from N(0, I) (RMS of z^K {np.median(tail):.3g}, "
        f"over the last tenth of the run; about 1 when they mix): the z step is too large for "
        "this teacher and the generator is trained on latents it never sees when sampling. "
        "Lower z_step_scale / max_z_step (e.g. 10x) or set update_z=False.",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def _warn_low_acceptance(acceptance: np.ndarray, config: DistillConfig) -> None:
    """Warn when a Metropolis-adjusted E-step accepted almost nothing over the last tenth of
    the run (its chains then stay at their exact generator draws and carry no signal)."""
    tail = acceptance[-max(1, len(acceptance) // 10) :]
    tail = tail[np.isfinite(tail)]  # NaN for unadjusted kernels
    if tail.size == 0 or np.median(tail) >= MIN_ESTEP_ACCEPTANCE:
        return
    warnings.warn(
        f"the E-step's {config.estep_sampler!r} chains accepted {np.median(tail):.3g} of their "
        f"proposals (median over the last tenth of the run; below {MIN_ESTEP_ACCEPTANCE}): they "
        "barely move from the generator's draws, so the M-step gradient is mostly noise. Lower "
        f"estep_step_size (now {config.estep_step_size:g}; Metropolis kernels need smaller "
        "steps as the dimension grows) or use estep_sampler='ula'.",
        RuntimeWarning,
        stacklevel=caller_stacklevel(),
    )


def _probe_idata(
    kernel, teacher, state: emd.EMDState, rng_key: PRNGKey, devices: tuple[str, ...]
) -> Any:
    """ArviZ data of E-step chains at the final parameters, at 3 noise levels (``devices``:
    those of the run, for ``attrs``; the probe chains are few and run replicated)."""
    from emdppl.inference_data import to_arviz

    config = kernel.config
    probe_sigmas = jnp.exp(jnp.linspace(jnp.log(config.sigma_min), jnp.log(config.sigma_max), 3))
    trajectory, acceptance = _probe(
        kernel,
        teacher,
        state,
        rng_key,
        probe_sigmas,
        config.num_probe_chains,
        config.num_probe_draws,
    )
    posterior = {name: to_host(x) for name, x in trajectory.items()}
    acceptance = to_host(acceptance)
    sample_stats = {}
    if not np.all(np.isnan(acceptance)):
        sample_stats["acceptance_rate"] = acceptance
    attrs = {
        "algorithm": f"emdppl.distill E-step chains ({config.method})",
        "estep_sampler": config.estep_sampler,
        "num_estep_steps": config.num_estep_steps,
        "probe_sigmas": [float(s) for s in probe_sigmas],
        "devices": list(devices),
    }
    return to_arviz(posterior, sample_stats or None, attrs)


# ------------------------------------------------------------------------------------------
# emdppl.infer(model, EMD(...)): a posterior distilled into a one-step generator.

@functools.partial(jax.jit, static_argnums=2)
def _resample(rng_key: PRNGKey, weights: jax.Array, num: int) -> jax.Array:
    """``num`` indices drawn with replacement with probabilities ``weights`` (one program,
    not a dozen eagerly compiled operations)."""
    return jax.random.choice(rng_key, weights.shape[0], (num,), p=weights)


#: Generator draws per returned draw in :class:`EMD`'s importance resampling.
IMPORTANCE_POOL = 4


def _checked_draws(
    teacher: DensityTeacher, generator: Any, rng_key: PRNGKey, n: int, resample: bool, advice: str
) -> tuple[jax.Array, dict, np.ndarray | None, str]:
    r"""``(draws (n, d), attrs, log_weights, warning)``: ``n`` one-step draws, checked by PSIS on
    a pool of ``IMPORTANCE_POOL * n`` (``n`` without ``resample``) and resampled from it with
    the smoothed weights when ``resample`` and :math:`\hat k \le 1`; otherwise the first ``n``
    raw draws with their ``log_weights (n,)`` (``None`` when resampled). ``attrs``:
    ``pareto_k``, ``importance_ess``, ``nonfinite_draws``, ``importance_resampled``."""
    k_pool, k_resample = jax.random.split(rng_key)
    pool = _sample(generator, k_pool, n * (IMPORTANCE_POOL if resample else 1))
    log_p, log_q = (np.asarray(x) for x in _log_densities(teacher, generator, pool))
    log_weights = log_p - log_q
    weights, k, warning = _fit(log_weights, pool, log_p, advice)
    attrs = {
        "pareto_k": k,
        "importance_ess": float(1 / np.sum(weights**2)),
        "nonfinite_draws": int(np.sum(~np.isfinite(np.asarray(pool)).all(axis=1))),
    }
    if not (resample and k <= 1.0):
        return pool[:n], {**attrs, "importance_resampled": 0}, log_weights[:n], warning
    index = _resample(k_resample, jnp.asarray(weights), n)
    return pool[index], {**attrs, "importance_resampled": 1}, None, warning

#: The posterior preset of :class:`EMD`. The posterior's noise range is narrow
#: (sigma in [sigma_max / 10, sigma_max] = [0.05, 0.5]), so the z step is a constant:
#: ``z_step_scale=200`` makes ``min(200 sigma^2, max_z_step) = max_z_step = 0.05`` there. It only
#: matters with ``update_z=True``.
POSTERIOR_CONFIG = DistillConfig(
    num_steps=1000,
    batch_size=128,
    estep_sampler="ula",
    num_estep_steps=8,
    estep_step_size=0.2,
    estep_grad_clip=5.0,
    noise_cancellation="full",
    weighting="sigma2",
    z_step_scale=200.0,
    max_z_step=0.05,
    update_z=False,
)


@eqx.filter_jit
def _log_densities(
    teacher: DensityTeacher, generator: Any, draws: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(log p(u), log q(u))`` (unnormalised) at the generator's draws ``u (n, d)``, each
    ``(n,)``."""
    return jax.vmap(lambda u: (teacher.log_prob(u), generator.log_prob(u)))(draws)


def psis(log_weights: Any, tolerance: float = 1e-3) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed importance sampling (Vehtari et al. 2024) of ``log_weights (n,)``:
    ``(weights (n,), k_hat)``, the smoothed weights normalised to sum 1 and the shape
    :math:`\hat k` of the generalised Pareto fit to the largest weights. Non-finite log weights
    get weight 0 and make :math:`\hat k = \infty`. Log weights within ``tolerance`` of each
    other (weights equal to 0.1% by default) are equal up to rounding, e.g. a generator equal
    to the posterior with both log densities computed in float32: they are used as they are,
    with :math:`\hat k = 0` (a tail fitted to rounding noise means nothing; ArviZ gives
    :math:`\infty` for it)."""
    import arviz as az

    log_weights = np.asarray(log_weights, np.float64)
    finite = np.isfinite(log_weights)
    weights = np.zeros_like(log_weights)
    if not finite.any():
        return weights, float("inf")
    kept = log_weights[finite] - np.max(log_weights[finite])
    if np.ptp(kept) < tolerance:  # q = p up to normalisation and rounding: no tail to fit
        smoothed, k = kept, 0.0
    else:
        psislw = getattr(az, "psislw", None)
        if psislw is None:  # ArviZ >= 1: arviz_stats' array interface
            from arviz_stats.base import array_stats

            psislw = array_stats.psislw
        smoothed, k = psislw(kept)
    kept_weights = np.exp(np.asarray(smoothed) - np.max(smoothed))
    weights[finite] = kept_weights / kept_weights.sum()
    return weights, float(k) if finite.all() else float("inf")


#: The end of :func:`check_fit`'s warning when every importance weight is finite.
FIT_ADVICE = " Raise num_steps or try generator='maf'."


def check_fit(
    log_weights: Any, draws: Any = None, log_p: Any = None
) -> tuple[np.ndarray, float]:
    r""":func:`psis` of one-step draws with importance log weights ``log p - log q`` (``(n,)``),
    warning when they do not represent the posterior: :math:`\hat k` above
    :math:`\min(1 - 1/\log_{10} n, 0.7)`, where importance-sampling (and so variational)
    estimates become unreliable (Yao et al. 2018; Vehtari et al. 2024).

    Non-finite weights are named in the warning, given the ``draws`` (``(n, d)``, in the
    teacher's standardised coordinates, where the posterior's scales are about one) and
    ``log_p`` (``(n,)``): how many draws have NaN or infinite coordinates, how many finite
    draws have a non-finite ``log p`` (and how far out the draws lie, in posterior sds) and how
    many a non-finite ``log q``.
    """
    weights, k, message = _fit(log_weights, draws, log_p)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())
    return weights, k


def _fit(
    log_weights: Any, draws: Any = None, log_p: Any = None, advice: str = FIT_ADVICE
) -> tuple[np.ndarray, float, str]:
    """``(weights, k_hat, warning)`` of :func:`check_fit`, the warning ``""`` for a good fit;
    ``advice`` ends it when the weights are finite."""
    log_weights = np.asarray(log_weights, np.float64)
    n = int(log_weights.shape[0])
    tolerance = 1e-3
    if log_p is not None and np.isfinite(log_p).any():  # float32 rounding of log p and log q
        scale = np.max(np.abs(np.asarray(log_p, np.float64)[np.isfinite(log_p)]))
        tolerance = max(tolerance, 64 * float(np.finfo(np.float32).eps) * float(scale))
    weights, k = psis(log_weights, tolerance)
    threshold = min(1 - 1 / np.log10(max(n, 11)), 0.7)
    if k <= threshold:
        return weights, k, ""
    cause = _nonfinite_weights(log_weights, draws, log_p) or advice
    message = (
        f"the distilled generator does not represent this posterior: PSIS k-hat "
        f"{k:.3g} > {threshold:.3g} (importance weights posterior / generator over "
        f"{n} draws). Means and sds from its draws can be wrong.{cause} Or use MCMC "
        "(emdppl.infer(model, 'nuts'))."
    )
    return weights, k, message


def _nonfinite_weights(log_weights: np.ndarray, draws: Any, log_p: Any) -> str:
    """The sentences of :func:`check_fit`'s warning on non-finite weights ('' when none)."""
    bad = ~np.isfinite(log_weights)
    n = log_weights.shape[0]
    if not bad.any():
        return ""
    if draws is None or log_p is None:
        return f" {int(bad.sum())} of {n} log weights are not finite."
    draws = np.asarray(draws, np.float64).reshape(n, -1)
    broken = ~np.isfinite(draws).all(axis=1)
    no_p = bad & ~broken & ~np.isfinite(np.asarray(log_p, np.float64))
    no_q = bad & ~broken & ~no_p
    parts = []
    if broken.any():
        parts.append(f"{int(broken.sum())} of {n} draws have NaN or infinite coordinates")
    if no_p.any():
        reach = np.median(np.abs(draws[no_p]).max(axis=1))
        parts.append(
            f"{int(no_p.sum())} of {n} finite draws have a non-finite posterior log density "
            f"(those draws lie a median {reach:.3g} posterior sds out, where the model's "
            "transforms overflow)"
        )
    if no_q.any():
        parts.append(f"{int(no_q.sum())} of {n} have a non-finite generator log density")
    return (
        " " + "; ".join(parts) + ". The generator diverged in training: lower learning_rate; "
        "update_z=True (mass covering, z sampled) over-disperses, try the default "
        "update_z=False."
    )


class OwnDensityStudent(generators_module.AbstractGenerator):
    r"""A generator whose student is its own *unsmoothed* density :math:`q_0`, at every sigma.

    Paired with a ``DensityTeacher(smoothing="none")`` (:class:`EMD`'s default): the E-step
    target :math:`p(x_\sigma)/q_0(x_\sigma)\,N(\varepsilon; 0, I)`, :math:`x_\sigma = g(z) +
    \sigma\varepsilon`, is then known exactly up to a constant (Metropolis-adjusted kernels
    apply) and equals :math:`N(0, I)` when :math:`q_0 = p`, so the fixed point is unbiased
    whatever sigma, with no smoothing approximation and no validity bound on ``sigma_max``.

    Attributes
    ----------
    inner
        A generator with an exact ``log_prob(x (d,))`` (sinh-arcsinh, MAF) or
        ``marginal_logdensity(x, sigma)`` (affine, evaluated at sigma = 0).
    """

    inner: generators_module.AbstractGenerator
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def __init__(self, inner: generators_module.AbstractGenerator) -> None:
        if not (hasattr(inner, "log_prob") or hasattr(inner, "marginal_logdensity")):
            raise ValueError(
                f"{type(inner).__name__} has no exact density (log_prob or marginal_logdensity); "
                "use sinh_arcsinh, maf or affine."
            )
        self.inner = inner
        self.latent_dim = inner.latent_dim
        self.data_dim = inner.data_dim

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.inner(z)

    def log_prob(self, x: jax.Array) -> jax.Array:
        r""":math:`\log q_0(x)` for ``x (d,)``; a scalar."""
        if hasattr(self.inner, "log_prob"):
            return self.inner.log_prob(x)
        return self.inner.marginal_logdensity(x, 0.0)

    def marginal_logdensity(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\log q_0(x)` (``sigma`` unused: the student is unsmoothed)."""
        return self.log_prob(x)

    def marginal_score(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\nabla\log q_0(x)` (``sigma`` unused)."""
        return jax.grad(self.log_prob)(x)


class EMD:
    r"""EM distillation of a model's posterior, for :func:`emdppl.infer`.

    The posterior (unconstrained, auxiliary space, standardised by a Laplace fit at the highest
    optimum L-BFGS reaches from :data:`~emdppl.teachers.NUM_LAPLACE_STARTS` starts) is the
    teacher (:func:`emdppl.teachers.density_teacher`). The default generator is
    :func:`emdppl.generators.sinh_arcsinh` (a small flow with an exact density); ``"maf"`` a
    masked autoregressive flow, ``"affine"`` a full-rank Gaussian, ``"mlp"`` an MLP with a
    learned student score. It is distilled with a cosine-decayed Adam learning rate.

    **Exact densities, no smoothing** (``smoothing="none"``, the default for every generator
    but ``"mlp"``): teacher and student are the posterior's and the generator's own log
    densities at every noise level (:class:`OwnDensityStudent`), so the E-step target is known
    exactly, is :math:`N(0, I)` when the generator equals the posterior (the fixed point is
    unbiased at every sigma), and costs one posterior gradient per E-step step. The Laplace-
    smoothed score (``smoothing="laplace"``) diverges once
    :math:`\sigma^2\lambda_{max}(-\nabla^2\log p) > 3` anywhere the chains go.

    **Checked and importance-resampled draws.** ``IMPORTANCE_POOL * num_samples`` one-step
    draws are weighted by :math:`p/q` (known up to a constant); PSIS :math:`\hat k`
    (:func:`check_fit`) warns when the generator does not represent the posterior, and
    ``num_samples`` draws are resampled with the smoothed weights (unless
    ``importance_resampling=False`` or :math:`\hat k > 1`, when the raw draws are returned with
    their ``sample_stats.log_weight``). The returned draws are then consistent for the
    posterior whenever :math:`\hat k` is small, whatever the generator's bias; they are
    ``num_chains`` chains of ``num_samples // num_chains`` draws (resampled draws repeat; the
    importance ESS is in ``posterior.attrs["importance_ess"]``).

    **z frozen by default.** ``update_z=False`` (with full noise cancellation) runs the E-step on
    :math:`\varepsilon` only: the K-step generalisation of Diff-Instruct (injected noise
    cancelled exactly), closer to a reverse-KL fit. ``update_z=True`` samples z too: the
    forward-KL, mass-covering fit, which over-disperses for a posterior the generator family
    cannot represent exactly (measurements: benchmarks/README.md).

    Parameters
    ----------
    num_samples, num_chains
        Draws returned, split into chains.
    learning_rate
        Peak Adam learning rate (cosine decay to 1% over ``num_steps``); ignored when an
        optimiser is given (``optimizer=``, or in ``config``).
    sigma_max
        Largest noise level of the posterior teacher.
    generator
        One of ``"sinh_arcsinh"``, ``"maf"``, ``"affine"``, ``"mlp"``.
    fallback_generator
        With exact densities, when the fit check fails (PSIS :math:`\hat k` above its threshold)
        or the distillation stops on NaN, the posterior is distilled again into this generator
        (same seed and settings) and the fit with the lower :math:`\hat k` is kept (a NaN stop
        counts as :math:`\infty`; when both stop, the error names both causes); the warning is
        given only if the kept fit fails the check too. ``posterior.attrs``: ``generator`` (the
        one kept) and ``fallback_pareto_k`` (the other's, or ``inf`` when it stopped on NaN).
        ``None``: no second try.
    smoothing
        ``"none"`` (exact densities, above) or ``"laplace"``; ``None``: ``"none"`` except for
        ``"mlp"``.
    importance_resampling
        Resample the draws with PSIS weights (above).
    devices
        Split the distillation's batch over these devices (:func:`distill`'s ``devices``;
        ``batch_size`` a multiple of their number); ``posterior.attrs["devices"]`` lists them.
    config, **options
        A :class:`~emdppl.distill_config.DistillConfig` (default :data:`POSTERIOR_CONFIG`) and
        field overrides (``num_steps=``, ``update_z=``, ...).

    Examples
    --------
    >>> idata = emdppl.infer(model, emdppl.EMD(num_steps=1500), model_kwargs=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        num_samples: int = 1000,
        num_chains: int = 4,
        learning_rate: float = 0.02,
        sigma_max: float = 0.5,
        generator: str = "sinh_arcsinh",
        fallback_generator: str | None = "maf",
        smoothing: str | None = None,
        importance_resampling: bool = True,
        devices: Devices = None,
        config: DistillConfig | None = None,
        **options: Any,
    ) -> None:
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
        if fallback_generator is not None and fallback_generator not in DENSITY_GENERATORS:
            raise ValueError(
                f"fallback_generator must be None or one of {DENSITY_GENERATORS} (a generator "
                f"with an exact density), got {fallback_generator!r}."
            )
        self.fallback_generator = fallback_generator
        if smoothing is None:
            smoothing = "laplace" if generator == "mlp" else "none"
        if smoothing not in SMOOTHINGS or (generator == "mlp" and smoothing == "none"):
            raise ValueError(
                f"smoothing must be one of {SMOOTHINGS} ('laplace' for generator='mlp', which has "
                f"no density of its own), got {smoothing!r}."
            )
        self.smoothing = smoothing
        self.importance_resampling = bool(importance_resampling)
        if num_chains < 1 or num_samples < num_chains or num_samples % num_chains:
            raise ValueError(
                f"num_samples={num_samples} must be a positive multiple of "
                f"num_chains={num_chains} (>= 1)."
            )
        if not sigma_max > 0 or not learning_rate > 0:
            raise ValueError(
                f"sigma_max={sigma_max} and learning_rate={learning_rate} must be > 0."
            )
        self.num_samples = int(num_samples)
        self.num_chains = int(num_chains)
        self.learning_rate = float(learning_rate)
        self.sigma_max = float(sigma_max)
        self.generator = generator
        given = config is not None and config.requested("optimizer") is not None
        self._has_optimizer = "optimizer" in options or given
        self.config = DistillConfig.from_options(config or POSTERIOR_CONFIG, **options)
        batch_mesh(devices, self.config.batch_size)  # a bad spec fails here, before any tracing
        self.devices = devices

    def __repr__(self) -> str:
        return (
            f"EMD(num_samples={self.num_samples}, num_chains={self.num_chains}, "
            f"learning_rate={self.learning_rate}, sigma_max={self.sigma_max}, "
            f"generator={self.generator!r}, fallback_generator={self.fallback_generator!r}, "
            f"devices={self.devices!r}, config={self.config!r})"
        )

    def _distill(
        self, teacher: DensityTeacher, name: str, config: DistillConfig, keys, progress_bar: bool
    ):
        """``(DistillResult, _draws(...))`` of the posterior distilled into generator ``name``;
        ``keys = (k_distill, k_sample)``."""
        k_distill, k_sample = keys
        key = jax.random.fold_in(k_distill, 1)
        if name in ("maf", "mlp"):
            generator = getattr(generators_module, name)(teacher.data_dim, key=key)
        else:
            generator = getattr(generators_module, name)(teacher.data_dim)
        if self.smoothing == "none":
            generator = OwnDensityStudent(generator)
        result = distill(
            teacher,
            generator,
            config=config,
            rng_key=k_distill,
            progress_bar=progress_bar,
            devices=self.devices,
        )
        return result, self._draws(teacher, result.generator, k_sample)

    def _attempt(
        self, teacher: DensityTeacher, name: str, config: DistillConfig, keys, progress_bar: bool
    ):
        """:meth:`_distill`'s value, or the ``FloatingPointError`` it raised (a NaN stop)."""
        try:
            return self._distill(teacher, name, config, keys, progress_bar)
        except FloatingPointError as error:
            return error

    def _draws(self, teacher: DensityTeacher, generator: Any, rng_key: PRNGKey):
        """``(draws (num_samples, d), attrs, sample_stats, warning)``: one-step draws, importance-
        resampled (see the class docstring) when ``importance_resampling`` and the fit check
        passes; ``sample_stats`` holds their ``log_weight`` when they are not resampled;
        ``warning`` is the fit check's (``""`` for a good fit)."""
        if self.smoothing != "none":
            return _sample(generator, rng_key, self.num_samples), {}, None, ""
        tried = "maf" in (self.generator, self.fallback_generator)
        draws, attrs, log_weights, warning = _checked_draws(
            teacher,
            generator,
            rng_key,
            self.num_samples,
            self.importance_resampling,
            " Raise num_steps." if tried else FIT_ADVICE,
        )
        stats = None
        if log_weights is not None:
            stats = {"log_weight": log_weights.reshape(self.num_chains, -1)}
        return draws, attrs, stats, warning

    def fit(
        self,
        rng_key: int | PRNGKey,
        model: Any,
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        auxiliary: bool = True,
        progress_bar: bool = True,
    ) -> EMDResult:
        """Distil ``model``'s posterior (NumPyro, Pyro, or a :class:`~emdppl.Target`) into a
        one-step generator, and check the fit (the class docstring). The fitted generator draws
        more posterior samples for the cost of one network pass each
        (:meth:`EMDResult.sample_posterior`); :meth:`infer` returns ``num_samples`` of them as
        ArviZ data. A fit that fails the check warns (and says so in ``result.warning``)."""
        from emdppl.problem import Problem

        problem = Problem.of(
            model, model_args=tuple(model_args), model_kwargs=model_kwargs, auxiliary=auxiliary
        )
        result, _ = self._distilled(problem, as_key(rng_key), progress_bar)
        if result.warning:
            warnings.warn(result.warning, RuntimeWarning, stacklevel=caller_stacklevel())
        return result

    def _distilled(self, problem: Problem, rng_key: PRNGKey, progress_bar: bool):
        """``(EMDResult, (draws, sample_stats))``: the kept fit and its ``num_samples`` checked
        draws (:meth:`_draws`)."""
        k_target, k_distill, k_sample = jax.random.split(rng_key, 3)
        target = problem.target(NUM_LAPLACE_STARTS, k_target)
        teacher = density_teacher(target, sigma_max=self.sigma_max, smoothing=self.smoothing)
        config = self.config
        if not self._has_optimizer:
            optimizer = cosine_adam(self.learning_rate, config.num_steps)
            config = dataclasses.replace(config, optimizer=optimizer)
        keys = (k_distill, k_sample)
        fallback = self.fallback_generator
        runs = {self.generator: self._attempt(teacher, self.generator, config, keys, progress_bar)}
        first = runs[self.generator]
        failed = isinstance(first, FloatingPointError)
        if self.smoothing == "none" and fallback not in (None, self.generator) and (
            failed or first[1][3]
        ):
            runs[fallback] = self._attempt(teacher, fallback, config, keys, progress_bar)
        errors = [run for run in runs.values() if isinstance(run, FloatingPointError)]
        if len(errors) == 1 == len(runs):
            raise first
        if len(errors) == 2:
            raise FloatingPointError(
                f"{first}\nThe fallback generator {fallback!r} stopped on NaN too:\n{errors[1]}"
            ) from first
        pareto_k = {
            name: float("inf") if isinstance(run, FloatingPointError) else run[1][1]["pareto_k"]
            for name, run in runs.items()
        }
        kept = min(pareto_k, key=pareto_k.get)  # a tie keeps the first generator
        distilled, (draws, importance, sample_stats, warning) = runs[kept]
        if len(runs) == 2:
            (other,) = set(runs) - {kept}
            importance = {**importance, "fallback_pareto_k": pareto_k[other]}
            if warning:
                warning += f" ({self.generator!r} and {fallback!r} were both tried.)"
        result = EMDResult(
            distilled.generator,
            kept,
            teacher,
            target,
            distilled,
            importance,
            warning,
            self.importance_resampling,
            problem.is_auxiliary,
        )
        return result, (draws, sample_stats)

    def infer(self, problem: Problem, *, rng_key: int | PRNGKey = 0, progress_bar: bool = True):
        """Distil ``problem``'s posterior into a one-step generator and sample it.

        Returns an ``arviz.InferenceData`` with the posterior's model sites (constrained) under
        dims ``(chain=num_chains, draw, ...)`` like MCMC, and the E-step chains as group
        ``estep_posterior``; :func:`emdppl.infer` adds the model's groups
        (:func:`emdppl.inference_data.add_model_groups`). :meth:`fit` keeps the generator.
        """
        from emdppl.inference_data import to_arviz

        result, (draws, sample_stats) = self._distilled(problem, as_key(rng_key), progress_bar)
        if result.warning:
            warnings.warn(result.warning, RuntimeWarning, stacklevel=caller_stacklevel())
        positions = jax.vmap(result.teacher.position)(draws)
        positions = jax.tree.map(lambda x: x.reshape(self.num_chains, -1, *x.shape[1:]), positions)
        posterior = {k: np.asarray(v) for k, v in result.target.postprocess(positions).items()}
        distilled, config = result.distillation, result.distillation.config
        attrs = {
            "algorithm": "emd",
            "generator": result.name,
            "num_steps": config.num_steps,
            "estep_sampler": config.estep_sampler,
            "num_estep_steps": config.num_estep_steps,
            "update_z": int(config.update_z),
            "noise_cancellation": config.noise_cancellation,
            "num_skipped_steps": int(distilled.state.num_skipped),
            "auxiliary": int(result.auxiliary),
            "devices": list(distilled.devices),
        }
        attrs.update(result.importance)
        estep = distilled.estep_idata.posterior if distilled.estep_idata is not None else None
        groups = {}
        if estep is not None:
            groups["estep_posterior"] = {name: np.asarray(estep[name].values) for name in estep}
        return to_arviz(posterior, sample_stats, attrs, **groups)


@dataclasses.dataclass(frozen=True)
class EMDResult:
    """A posterior distilled into a one-step generator (:meth:`EMD.fit`).

    Attributes
    ----------
    generator
        The fitted generator: ``u = generator(z)``, ``z (latent_dim,) ~ N(0, I)``, a point of
        the posterior in the teacher's standardised coordinates (``teacher.position(u)`` is
        the target's position).
    name
        Which generator it is (``EMD``'s ``generator``, or its ``fallback_generator``).
    teacher
        The :class:`~emdppl.teachers.DensityTeacher` of the posterior.
    target
        The problem's :class:`~emdppl.Target` (its ``postprocess_fn`` gives the model's sites).
    distillation
        The :class:`DistillResult` of the kept fit.
    importance
        The fit check: ``pareto_k``, ``importance_ess``, ``nonfinite_draws`` (and
        ``fallback_pareto_k`` when the fallback ran).
    warning
        The fit check's warning (``""``: the fit passed).
    importance_resampling
        ``EMD``'s setting, the default of :meth:`sample_posterior`.
    auxiliary
        Whether the model was fitted in auxiliary form.
    """

    generator: Any
    name: str
    teacher: DensityTeacher
    target: Any
    distillation: DistillResult
    importance: dict
    warning: str
    importance_resampling: bool = True
    auxiliary: bool = True

    def sample_posterior(
        self,
        rng_key: int | PRNGKey,
        num_samples: int,
        *,
        importance_resampling: bool | None = None,
    ) -> dict:
        r"""``num_samples`` posterior draws of every model site (constrained, and the
        deterministic sites), each ``(num_samples, ...)``.

        Without resampling they are independent one-step draws :math:`g(z)`: one network pass
        each, in one compiled program. With ``importance_resampling`` (default: ``EMD``'s
        setting) they are resampled with PSIS weights :math:`p/q` from ``IMPORTANCE_POOL``
        times as many draws, which makes them consistent for the posterior where
        :math:`\hat k` is small, at the cost of one log density per pool draw; the fit check
        then runs on that pool (a ``RuntimeWarning`` when it fails, and raw draws when
        :math:`\hat k > 1`).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        resample = self.importance_resampling if importance_resampling is None else (
            importance_resampling
        )
        key = as_key(rng_key)
        if not resample or self.teacher.smoothing != "none":
            return self._sites_at(_latents(key, num_samples, self.generator.latent_dim))
        draws, _, _, warning = _checked_draws(
            self.teacher, self.generator, key, num_samples, True, FIT_ADVICE
        )
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=caller_stacklevel())
        return _sites(self.teacher, self.target, draws)

    @functools.cached_property
    def _sites_at(self) -> Callable[[jax.Array], dict]:
        """``z (n, latent_dim) -> {name: (n, ...)}``, the model's sites at ``g(z)``: one program
        with the fitted generator as constants (no per-call flattening of the modules)."""
        return jax.jit(lambda z: _sites(self.teacher, self.target, jax.vmap(self.generator)(z)))


@eqx.filter_jit
def _sites(teacher: DensityTeacher, target: Any, draws: jax.Array) -> dict:
    """The model's sites ``{name: (n, ...)}`` at teacher coordinates ``draws (n, d)``."""
    positions = jax.tree.map(lambda x: x[None], jax.vmap(teacher.position)(draws))
    return {name: value[0] for name, value in target.postprocess(positions).items()}
