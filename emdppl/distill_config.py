r"""``DistillConfig``: every setting of an EM-distillation run, validated once and frozen.

One value replaces the long keyword lists of :func:`emdppl.distill`, the kernel builder
:func:`emdppl.emd.build_kernel` and the posterior preset :class:`emdppl.EMD`. It is hashable, so
it is a static argument of the jitted step (two runs with equal configurations and optimisers
share compiled code).

``method="diff_instruct"`` fixes ``num_estep_steps=1``, ``update_z=False`` and
``noise_cancellation="full"`` (``docs/EMD.md`` §6); ``method="emd"`` defaults to K = 4, z sampled
with the Jacobian-scaled z step and the Stein residual in place of cancellation (cancellation is
unbiased only with z frozen, §4.2).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import optax

from emdppl.base import caller_stacklevel
from emdppl.samplers import get_sampler

__all__ = [
    "DistillConfig",
    "METHODS",
    "NOISE_CANCELLATIONS",
    "WEIGHTINGS",
    "Z_STEP_RULES",
    "adam",
    "cosine_adam",
]

METHODS = ("emd", "diff_instruct")
NOISE_CANCELLATIONS = ("full", "initial", "none", "residual")
Z_STEP_RULES = ("sigma2", "jacobian")
WEIGHTINGS = ("sigma2", "sigma")
_DIFF_INSTRUCT = {"num_estep_steps": 1, "update_z": False, "noise_cancellation": "full"}
# fields whose default is filled in (``from_options`` re-derives them; ``requested`` tells)
_DERIVED = (*_DIFF_INSTRUCT, "optimizer", "student_optimizer")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    r"""Settings of :func:`emdppl.distill` (all keyword arguments there are fields here).

    Attributes
    ----------
    method
        ``"emd"`` or ``"diff_instruct"`` (K = 1, z frozen, full cancellation).
    num_steps, batch_size
        Generator (M-step) updates, and E-step chains per update.
    estep_sampler
        A registered sampler. Gradient-only ones (``ula``, ``sgld``, ``sghmc``) take scores;
        ``mala``/``hmc`` need ``teacher.log_prob`` and a generator with ``marginal_logdensity``.
    num_estep_steps
        K, kernel steps per E-step (``None``: 4 for EMD). K = 0 has zero expected gradient
        (``docs/EMD.md`` §6.3).
    estep_step_size
        :math:`\gamma_\varepsilon`, the sampler's step size.
    noise_cancellation
        ``"full"`` | ``"initial"`` | ``"none"`` | ``"residual"`` (the Stein residual
        :math:`\sigma\Delta(x^K)` in place of :math:`\varepsilon^K`, ``docs/EMD.md`` §4.3; exactly
        Diff-Instruct's residual over ``estep_step_size`` at K = 0); ``None``: ``"residual"`` when
        z moves, else ``"full"``. The defaults (K = 4, residual, ``z_step_rule="jacobian"``) were
        chosen on generated mixtures and checked on held-out ones (``benchmarks/README.md``).
    update_z
        Sample z in the E-step (``None``: ``True`` for EMD); frozen z keeps the generator's draw.
    z_step_scale, max_z_step
        :math:`\gamma_z(\sigma) = \min(c_z\sigma^2, \gamma_{z,max})`, so the z block takes
        smaller steps at low noise, where the E-step target is sharp in z (§3.3).
    z_step_rule
        ``"sigma2"`` (the rule above) or ``"jacobian"`` (the default): that step divided per
        chain by :math:`1 + \|J_g(z^0)\|_F^2`, the z block's stiffness where the generator stretches
        space between modes (one forward-mode Jacobian per chain and E-step).
    sigma_range
        ``(sigma_min, sigma_max)`` of the log-uniform noise levels of E/M-steps and student DSM;
        ``None``: ``(max(teacher.sigma_min, sigma_data/50), min(teacher.sigma_max,
        4 sigma_data))``, filled in by :meth:`for_teacher`.
    weighting
        :math:`w(\sigma)`: ``"sigma2"`` (Diff-Instruct's weight 1 on the denoiser difference)
        or ``"sigma"``.
    optimizer, student_optimizer
        optax transformations for the generator :math:`\theta` and the student :math:`\psi`.
        ``None``: Adam 1e-3 for both. A generator copied from an exact
        :class:`~emdppl.teachers.GaussianMixture` teacher (its parameters are the modes'
        locations and scales, in data units) fits far better with ``cosine_adam(3e-2,
        num_steps, max_grad_norm=1.0)``, the gain mostly in those copied parameters; it is not
        the default because it wrecks a teacher-initialised 64-D image generator, and a
        per-layer trust ratio (LAMB-style) did not serve both (``benchmarks/README.md``).
    student_updates_per_step, student_warmup_steps
        Student DSM updates per generator step (TTUR) and before the first step.
    max_consecutive_nan
        Non-finite steps are skipped and counted; this many in a row stop the run.
    estep_grad_clip
        The (eps, z) gradient of gradient-only E-step kernels is scaled down to an RMS of at most
        this (a standard-normal block's RMS is about 1): a chain where the teacher/student score
        difference is out of scale cannot diverge. ``None``: no clip.
    num_probe_chains, num_probe_draws
        Shape of the diagnostic E-step chains in ``DistillResult.estep_idata`` (3 probe noise
        levels); ``num_probe_draws=0`` skips them.

    Examples
    --------
    >>> config = emdppl.DistillConfig(num_steps=500, num_estep_steps=4)
    >>> config.noise_cancellation
    'residual'
    >>> emdppl.DistillConfig(method="diff_instruct").num_estep_steps
    1
    """

    method: str = "emd"
    num_steps: int = 2000
    batch_size: int = 256
    estep_sampler: str = "ula"
    num_estep_steps: int | None = None
    estep_step_size: float = 0.2
    noise_cancellation: str | None = None
    update_z: bool | None = None
    z_step_scale: float = 0.2
    max_z_step: float = 0.5
    z_step_rule: str = "jacobian"
    sigma_range: tuple[float, float] | None = None
    weighting: str = "sigma2"
    optimizer: optax.GradientTransformation | None = None
    student_optimizer: optax.GradientTransformation | None = None
    student_updates_per_step: int = 2
    student_warmup_steps: int = 500
    max_consecutive_nan: int = 20
    estep_grad_clip: float | None = 5.0
    num_probe_chains: int = 4
    num_probe_draws: int = 200
    # what the user asked for before the method's defaults were filled in (for ``from_options``)
    _requested: tuple | None = dataclasses.field(
        init=False, repr=False, compare=False, default=None
    )

    def __post_init__(self) -> None:
        requested = tuple(getattr(self, name) for name in _DERIVED)
        object.__setattr__(self, "_requested", requested)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        for name, value in _resolved_estep(self).items():
            object.__setattr__(self, name, value)
        self._check_values()
        for name in ("optimizer", "student_optimizer"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, adam(1e-3))
            elif not isinstance(value, optax.GradientTransformation):
                raise TypeError(
                    f"{name} must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), "
                    f"got {type(value).__name__}."
                )
        get_sampler(self.estep_sampler)  # unknown names list the known ones

    def _check_values(self) -> None:
        if self.noise_cancellation not in NOISE_CANCELLATIONS:
            raise ValueError(
                f"noise_cancellation must be one of {NOISE_CANCELLATIONS}, got "
                f"{self.noise_cancellation!r}."
            )
        if self.z_step_rule not in Z_STEP_RULES:
            raise ValueError(
                f"z_step_rule must be one of {Z_STEP_RULES}, got {self.z_step_rule!r}."
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if self.estep_grad_clip is not None and not self.estep_grad_clip > 0:
            raise ValueError(f"estep_grad_clip must be > 0 or None, got {self.estep_grad_clip}.")
        minimum = {
            "num_steps": 1,
            "batch_size": 1,
            "max_consecutive_nan": 1,
            "num_estep_steps": 0,
            "student_updates_per_step": 0,
            "student_warmup_steps": 0,
            "num_probe_chains": 1,
            "num_probe_draws": 0,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not (self.estep_step_size > 0 and self.z_step_scale > 0 and self.max_z_step > 0):
            raise ValueError("estep_step_size, z_step_scale and max_z_step must be > 0.")
        if self.sigma_range is not None:
            low, high = self.sigma_range
            if not 0 < low < high:
                raise ValueError(
                    f"sigma_range must satisfy 0 < min < max, got {tuple(self.sigma_range)}."
                )

    @property
    def sigma_min(self) -> float:
        return self._sigma_range()[0]

    @property
    def sigma_max(self) -> float:
        return self._sigma_range()[1]

    def _sigma_range(self) -> tuple[float, float]:
        if self.sigma_range is None:
            raise ValueError("sigma_range is not set: call config.for_teacher(teacher) first.")
        return float(self.sigma_range[0]), float(self.sigma_range[1])

    def for_teacher(self, teacher) -> DistillConfig:
        """This configuration with ``sigma_range`` defaulted from ``teacher``'s noise scales."""
        if self.sigma_range is not None:
            return self
        sigma_range = (
            max(teacher.sigma_min, teacher.sigma_data / 50),
            min(teacher.sigma_max, 4 * teacher.sigma_data),
        )
        return dataclasses.replace(self, sigma_range=sigma_range)

    def requested(self, name: str):
        """What the user gave for ``name``, one of the fields whose default is filled in
        (K, z, cancellation, the optimisers); ``None``: the default was taken."""
        return dict(zip(_DERIVED, self._requested, strict=True))[name]

    @classmethod
    def from_options(cls, config: DistillConfig | None = None, **options) -> DistillConfig:
        """``config`` (default ``DistillConfig()``) with ``options`` replaced; unknown names
        are refused with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown distillation option(s) {unknown}; known: {sorted(known)}.")
        if config is None:
            return cls(**options)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an emdppl.DistillConfig, got {type(config).__name__}.")
        requested = {name: config.requested(name) for name in _DERIVED}
        return dataclasses.replace(config, **{**requested, **options})


@functools.cache
def adam(learning_rate: float | optax.Schedule) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)``, one object per argument: the optimiser is a static part
    of the jitted step, so a fresh one per run would compile every run anew."""
    return optax.adam(learning_rate)


@functools.cache
def cosine_adam(
    learning_rate: float, num_steps: int, max_grad_norm: float | None = None
) -> optax.GradientTransformation:
    """Adam with a cosine decay from ``learning_rate`` to 1% of it over ``num_steps``, after
    clipping the gradient's global norm at ``max_grad_norm`` (``None``: no clipping); one object
    per argument tuple (see :func:`adam`)."""
    optimizer = adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.01))
    if max_grad_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optimizer)


def _resolved_estep(config: DistillConfig) -> dict:
    """``num_estep_steps``, ``update_z``, ``noise_cancellation`` after the method's defaults."""
    given = {name: getattr(config, name) for name in _DIFF_INSTRUCT}
    if config.method == "diff_instruct":
        conflicts = {k: v for k, v in given.items() if v is not None and v != _DIFF_INSTRUCT[k]}
        if conflicts:
            raise ValueError(
                f"method='diff_instruct' fixes {_DIFF_INSTRUCT}; drop {sorted(conflicts)} or use "
                "method='emd'."
            )
        return dict(_DIFF_INSTRUCT)
    num_estep_steps = 4 if given["num_estep_steps"] is None else given["num_estep_steps"]
    update_z = True if given["update_z"] is None else bool(given["update_z"])
    cancellation = given["noise_cancellation"]
    if cancellation is None:
        cancellation = "residual" if update_z else "full"
    if num_estep_steps == 1 and update_z and cancellation not in ("none", "residual"):
        warnings.warn(
            f"method='emd' with K=1, z sampled and noise_cancellation={cancellation!r}: "
            "cancellation is biased when z moves, and with one step the bias outweighs the "
            "signal (the generator diverges on the 2-D mixtures, benchmarks/README.md). Use "
            "K >= 2, update_z=False (K-step Diff-Instruct) or noise_cancellation='none'.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    return {
        "num_estep_steps": num_estep_steps,
        "update_z": update_z,
        "noise_cancellation": cancellation,
    }

