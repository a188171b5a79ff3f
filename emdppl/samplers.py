"""The sampler registry: one dict from a name to a :class:`Sampler`.

A :class:`Sampler` holds blackjax's two levels: static ``options`` (hashable, fixed when the
kernel is built) and per-chain ``parameters`` (arrays, set by warm-up: step size, mass matrix, ...).
Every kernel is called as ``kernel(rng_key, state, target_fn, parameters)``, where ``target_fn``
is the log density for samplers with ``needs_logdensity=True`` (Metropolis-adjusted kernels) and
the gradient of the log density otherwise (unadjusted kernels, which EM distillation drives with
diffusion scores). Kernels are called on one chain; callers ``vmap`` over chains.

Registered here: blackjax's ``nuts``, ``hmc``, ``barker`` and emdppl's preconditioned ``mala``
(:mod:`emdppl.kernels.mala`), all with Stan's window schedule (step size by dual averaging towards
a target acceptance that suits the kernel, diagonal or dense mass matrix). ``mala``,
``barker`` and ``hmc``, whose step (and for HMC fixed path) is bound by the worst-scaled
direction, adapt without any absolute scale (``adaptation="scale_free"``): the first metric
from the curvature at the start, a searched first step size, each window's metric shrunk
towards the previous one; ``nuts`` keeps blackjax's window adaptation (``adaptation="stan"``;
its draws are those of earlier releases). Then ``mclmc`` (the MCLMC
tuner, started from the curvature's metric), ``sgld`` and ``sghmc`` (driven by the full
gradient), and emdppl's own unadjusted Langevin ``ula``. (blackjax's ``barker`` takes its
matrix inverted; :class:`_Barker` hands it the inverse.)

Each sampler also names where its chains start by default (:attr:`Sampler.default_init`, see
:class:`emdppl.MCMC`): ``"uniform"`` for NUTS and HMC, which find the typical set from anywhere;
``"optimize"`` for MALA, Barker and MCLMC, whose warm-up cannot cross the orders of magnitude of
log density between a uniform draw and the typical set of a badly scaled posterior.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.mass_matrix import MassMatrixAdaptationState, welford_algorithm
from blackjax.adaptation.metric_recipes import MetricCore, lookup_recipe

# The staged engine's (init, update, final) one step at a time: its public face,
# window_adaptation.base, is deprecated in blackjax 1.7.1 (pyproject pins >= 1.7.1, < 1.8).
from blackjax.adaptation.staged_adaptation import _make_engine, build_schedule
from jax.flatten_util import ravel_pytree

from emdppl.base import PRNGKey, PyTree, tree_where
from emdppl.curvature import difference_diagonal, exact_or_differences
from emdppl.kernels import mala as mala_module
from emdppl.kernels import ula as ula_module

__all__ = [
    "INIT_STRATEGIES",
    "Adaptation",
    "SAMPLERS",
    "PositionState",
    "Sampler",
    "find_step_size",
    "get_sampler",
    "hessian_diagonal",
    "laplace_inverse_mass_matrix",
    "register_sampler",
    "samplers",
    "welford_metric",
]

#: Where chains start (:class:`emdppl.MCMC`'s ``init``), besides a dict of values.
INIT_STRATEGIES = ("uniform", "median", "optimize")


class PositionState(NamedTuple):
    """Chain state of the stochastic-gradient kernels, which carry nothing but the position."""

    position: PyTree


class Adaptation(NamedTuple):
    """A warm-up that adapts the kernel's parameters one kernel step at a time.

    :class:`emdppl.MCMC` runs such a warm-up and the sampling through one compiled step (the
    kernel then appears once in the program XLA compiles, not once per phase). All functions
    are for one chain; ``options`` are the sampler's options.

    Attributes
    ----------
    init
        ``init(rng_key, position, logdensity_fn, options) -> state``.
    parameters
        ``parameters(state) -> dict``: the kernel parameters in force during warm-up.
    update
        ``update(state, stage, chain_state, info, options) -> state`` after a kernel step;
        ``stage`` is the step's row of ``schedule``.
    final
        ``final(state, options) -> dict``: the parameters sampling uses (the keys of
        ``parameters``).
    schedule
        ``schedule(num_steps) -> array (num_steps, 2)`` of ints, one row per warm-up step.
    """

    init: Callable
    parameters: Callable
    update: Callable
    final: Callable
    schedule: Callable


class Sampler(NamedTuple):
    """One registered sampler.

    Attributes
    ----------
    name
        Registry name.
    init
        ``init(position, target_fn, rng_key) -> state`` for one chain.
    build_kernel
        ``build_kernel(options) -> kernel``; ``kernel(rng_key, state, target_fn, parameters)
        -> (state, info)``.
    stats
        ``stats(state, info) -> dict`` of per-draw statistics under ArviZ's names (``lp``,
        ``acceptance_rate``, ``diverging``, ``energy``, ``n_steps``, ...) and always
        ``n_grad_evals``.
    defaults
        The options this sampler accepts, with their default values.
    parameters
        ``parameters(position, options) -> dict`` of kernel parameters when no warm-up is run.
    warmup
        ``warmup(rng_key, position, logdensity_fn, num_steps, options) -> (state, parameters)``
        for one chain, a whole warm-up in one call, or ``None``.
    grads_per_step
        Gradient evaluations per step, or ``None`` when it varies (read ``n_grad_evals``).
    needs_logdensity
        ``True`` when ``target_fn`` is a log density; ``False`` when it is its gradient.
    is_exact
        ``True`` for Metropolis-adjusted kernels (invariant for the target); ``False`` for
        unadjusted ones, whose stationary law carries a step-size bias.
    default_init
        Where :class:`emdppl.MCMC` starts the chains unless told (one of
        :data:`INIT_STRATEGIES`).
    adaptation
        An :class:`Adaptation` (a warm-up step by step), or ``None``. A sampler has at most one
        of ``warmup`` and ``adaptation``; with neither, warm-up is burn-in with the default
        parameters.
    """

    name: str
    init: Callable[[PyTree, Callable, PRNGKey], Any]
    build_kernel: Callable[[dict], Callable]
    stats: Callable[[Any, Any], dict]
    defaults: dict
    parameters: Callable[[PyTree, dict], dict]
    warmup: Callable | None
    grads_per_step: int | None
    needs_logdensity: bool
    is_exact: bool
    default_init: str = "uniform"
    adaptation: Adaptation | None = None

    @property
    def adapts(self) -> bool:
        """Whether warm-up adapts the kernel's parameters (``warmup`` or ``adaptation``)."""
        return self.warmup is not None or self.adaptation is not None

    def options(self, **options: Any) -> dict:
        """Return the defaults updated with ``options``; an unknown option is a ``ValueError``."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"sampler {self.name!r} has no option(s) {unknown}; its options are "
                f"{sorted(self.defaults)}."
            )
        return {**self.defaults, **options}


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(
    name: str,
    *,
    init: Callable,
    build_kernel: Callable[[dict], Callable],
    stats: Callable[[Any, Any], dict],
    defaults: dict | None = None,
    parameters: Callable[[PyTree, dict], dict] | None = None,
    warmup: Callable | None = None,
    grads_per_step: int | None = None,
    needs_logdensity: bool = True,
    is_exact: bool = True,
    default_init: str = "uniform",
    adaptation: Adaptation | None = None,
    replace: bool = False,
) -> Sampler:
    """Add a sampler to the registry and return it.

    See :class:`Sampler` for the meaning of each argument. Registering a name twice is a
    ``ValueError`` unless ``replace=True`` (e.g. re-running a notebook cell that defines it).
    Without ``parameters``, the kernel's parameters are ``{"step_size": options["step_size"]}``,
    so ``defaults`` must give a ``step_size``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, emdppl
    >>> from emdppl.kernels import ula
    >>> def build(options):
    ...     kernel = ula.build_kernel()
    ...     def k(key, state, grad_fn, params):
    ...         return kernel(key, state, grad_fn, params["step_size"])
    ...     return k
    >>> emdppl.register_sampler(
    ...     "my_ula", init=lambda x, grad_fn, key: ula.init(x), build_kernel=build,
    ...     stats=lambda state, info: {"n_grad_evals": jnp.ones((), jnp.int32)},
    ...     defaults={"step_size": 0.01}, grads_per_step=1, needs_logdensity=False, is_exact=False,
    ... )  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a sampler's name must be a non-empty str, got {name!r}.")
    if name in SAMPLERS and not replace:
        raise ValueError(
            f"a sampler named {name!r} is already registered; registered samplers: {samplers()}. "
            "Pass replace=True to register it anew."
        )
    for what, fn in (("init", init), ("build_kernel", build_kernel), ("stats", stats)):
        if not callable(fn):
            raise TypeError(f"register_sampler({name!r}): {what} must be callable, got {fn!r}.")
    if default_init not in INIT_STRATEGIES:
        raise ValueError(
            f"register_sampler({name!r}): default_init must be one of {INIT_STRATEGIES}, got "
            f"{default_init!r}."
        )
    if warmup is not None and adaptation is not None:
        raise ValueError(
            f"register_sampler({name!r}): give a whole warm-up (warmup=) or a step-by-step one "
            "(adaptation=), not both."
        )
    defaults = dict(defaults or {})
    if parameters is None:
        if "step_size" not in defaults:
            raise ValueError(
                f"register_sampler({name!r}): without a parameters function the kernel gets "
                "{'step_size': options['step_size']}, so defaults needs a 'step_size' (e.g. "
                "defaults={'step_size': 0.1}); or pass parameters=..."
            )

        def parameters(position: PyTree, options: dict) -> dict:
            return {"step_size": jnp.asarray(options["step_size"], jnp.float32)}

    sampler = Sampler(
        name=name,
        init=init,
        build_kernel=build_kernel,
        stats=stats,
        defaults=defaults,
        parameters=parameters,
        warmup=warmup,
        grads_per_step=grads_per_step,
        needs_logdensity=needs_logdensity,
        is_exact=is_exact,
        default_init=default_init,
        adaptation=adaptation,
    )
    SAMPLERS[name] = sampler
    return sampler


def samplers() -> list[str]:
    """The registered sampler names, sorted."""
    return sorted(SAMPLERS)


def get_sampler(name: str) -> Sampler:
    """Look up a sampler; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; registered samplers: {samplers()}.") from None


# --------------------------------------------------------------------------------------------
# Metropolis-adjusted kernels with Stan's window adaptation (blackjax).


def _flat_size(position: PyTree) -> int:
    return sum(jnp.size(leaf) for leaf in jax.tree.leaves(position))


def find_step_size(
    rng_key: PRNGKey,
    kernel: Callable,
    state: Any,
    logdensity_fn: Callable,
    step_size: float,
    inverse_mass_matrix: jax.Array,
    target_accept: float,
    *,
    num_proposals: int = 16,
    max_num_doublings: int = 64,
    **kernel_options: Any,
) -> jax.Array:
    r"""A first step size for dual averaging: double or halve until the acceptance crosses
    ``target_accept`` (Hoffman & Gelman 2014, Algorithm 4).

    The acceptance of a step size is the mean Metropolis acceptance probability of
    ``num_proposals`` one-step proposals from ``state`` (NaN counted as 0), which is less noisy
    than one proposal for the kernels whose acceptance depends on the noise draw (MALA, Barker):
    :math:`arlpha(\epsilon) = rac{1}{n} \sum_{j=1}^{n} lpha_j(\epsilon)`. From
    :math:`\epsilon_0` = ``step_size``, :math:`\epsilon_{k+1} = 2^{s} \epsilon_k` with
    :math:`s = \mathrm{sign}(arlpha(\epsilon_0) - lpha^*)`, until the sign flips; the
    result is the last step size on the accepting side (acceptance above the target), at most
    ``max_num_doublings`` factors of 2 from ``step_size``.

    Parameters
    ----------
    rng_key
        Key for the proposals.
    kernel
        ``kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix, **kernel_options)
        -> (state, info)`` with ``info.acceptance_rate``, for one chain.
    state
        Where the proposals start (the chain does not move).
    logdensity_fn
        The log density.
    step_size
        Scalar start of the search.
    inverse_mass_matrix
        ``(d,)`` or ``(d, d)``, the metric the step size is for.
    target_accept
        :math:`lpha^*`.

    Returns
    -------
    jax.Array
        Scalar step size.
    """
    step_size = jnp.asarray(step_size, jnp.float32)

    def acceptance(key, eps):
        keys = jax.random.split(key, num_proposals)

        def one(k):
            _, info = kernel(k, state, logdensity_fn, eps, inverse_mass_matrix, **kernel_options)
            return info.acceptance_rate

        return jnp.mean(jnp.nan_to_num(jax.vmap(one)(keys), nan=0.0))

    keys = jax.random.split(rng_key, max_num_doublings + 1)
    direction = jnp.where(acceptance(keys[0], step_size) > target_accept, 1.0, -1.0)

    def cond(carry):
        i, _, is_crossed = carry
        return (i < max_num_doublings) & ~is_crossed

    def body(carry):
        i, eps, _ = carry
        trial = eps * 2.0**direction
        is_crossed = (acceptance(keys[i + 1], trial) > target_accept) != (direction > 0)
        # halving: keep the first step size that accepts; doubling: the last one that does
        eps = jnp.where((direction < 0) | ~is_crossed, trial, eps)
        return i + 1, eps, is_crossed

    _, step_size, _ = jax.lax.while_loop(cond, body, (0, step_size, jnp.array(False)))
    return step_size


def _identity_metric(position: PyTree, dense: bool) -> jax.Array:
    d = _flat_size(position)
    return jnp.eye(d) if dense else jnp.ones(d)


def hessian_diagonal(logdensity_fn: Callable, position: PyTree) -> jax.Array:
    r"""The diagonal of the Hessian of ``logdensity_fn`` at ``position``, flattened.

    :math:`H_{ii} = e_i^\top \nabla^2 \log p(x)\, e_i`, one Hessian-vector product (forward over
    reverse) per coordinate, 16 at a time: about ``2 d`` gradient evaluations for a position of
    ``d`` scalars; central differences of the gradient where the density has no forward-mode
    derivative (:func:`emdppl.curvature.difference_diagonal`). Returns shape ``(d,)``.
    """
    x, unravel = ravel_pytree(position)
    grad_fn = jax.grad(lambda v: logdensity_fn(unravel(v)))

    def curvature(i):
        e = jax.nn.one_hot(i, x.shape[0], dtype=x.dtype)
        return e @ jax.jvp(grad_fn, (x,), (e,))[1]

    return exact_or_differences(
        lambda: jax.lax.map(curvature, jnp.arange(x.shape[0]), batch_size=16),
        lambda: difference_diagonal(grad_fn, x),
    )


def laplace_inverse_mass_matrix(logdensity_fn: Callable, position: PyTree) -> jax.Array:
    r"""A first diagonal inverse mass matrix from the curvature at ``position``:
    :math:`m_i = -1 / H_{ii}` where that is positive and finite, else 1 (shape ``(d,)``).

    At a mode these are the conditional variances of the Laplace approximation, the right
    scale per coordinate without a single draw; from the optimised start of
    :class:`emdppl.MCMC` (``init="optimize"``) that is where the chains are.
    """
    h = hessian_diagonal(logdensity_fn, position)
    variance = -1.0 / h
    return jnp.where((h < 0) & jnp.isfinite(variance) & (variance > 0), variance, 1.0)


#: Pseudo-count of a window's regularisation, as in Stan: ``(n / (n + 5)) Sigma + (5 / (n + 5)) T``.
SHRINKAGE_COUNT = 5.0


def welford_metric(is_diagonal: bool, initial_inverse_mass_matrix: jax.Array) -> MetricCore:
    r"""Stan's windowed Welford metric, regularised towards the previous window's metric.

    At the end of a window of ``n`` draws with covariance estimate :math:`\hat\Sigma` (shape
    ``(d,)`` diagonal or ``(d, d)`` dense),

    .. math::  M^{-1}_{k+1} = \frac{n}{n + 5} \hat\Sigma + \frac{5}{n + 5} M^{-1}_k,

    starting from ``initial_inverse_mass_matrix`` (shape ``(d,)``; a diagonal matrix when
    dense). Stan shrinks towards :math:`10^{-3} I` instead, an absolute scale that dominates
    any variance below about :math:`10^{-5}` (a regression coefficient of sd
    :math:`10^{-4}`) and costs the one-gradient kernels (MALA, Barker), whose step is set by
    the worst-scaled direction, orders of magnitude in step size. This rule has no scale of its
    own: rescaling every coordinate by :math:`c` rescales :math:`M^{-1}` by :math:`c^2`. A
    window with a non-finite estimate keeps the previous metric.
    """
    wf_init, wf_update, wf_final = welford_algorithm(is_diagonal)
    initial = initial_inverse_mass_matrix if is_diagonal else jnp.diag(initial_inverse_mass_matrix)

    def init(n_dims: int) -> MassMatrixAdaptationState:
        return MassMatrixAdaptationState(initial, wf_init(n_dims))

    def update(state, position, grad=None):
        del grad
        return state._replace(wc_state=wf_update(state.wc_state, ravel_pytree(position)[0]))

    def final(state: MassMatrixAdaptationState) -> MassMatrixAdaptationState:
        covariance, count, _ = wf_final(state.wc_state)
        weight = count / (count + SHRINKAGE_COUNT)
        estimate = weight * covariance + (1.0 - weight) * state.inverse_mass_matrix
        is_usable = jnp.all(jnp.isfinite(estimate))
        inverse_mass_matrix = jnp.where(is_usable, estimate, state.inverse_mass_matrix)
        return MassMatrixAdaptationState(inverse_mass_matrix, wf_init(initial.shape[0]))

    return MetricCore(init=init, update=update, final=final)


#: The warm-ups of the window-adapted samplers (their ``adaptation`` option).
ADAPTATIONS = ("stan", "scale_free")


def _window_adaptation(module: Any, option_names: tuple[str, ...] = ()) -> Adaptation:
    """Window adaptation: Stan's schedule of step size by dual averaging and a diagonal or
    dense mass matrix, step by step (blackjax's staged engine); the ``option_names`` options
    are passed on to the kernel.

    ``adaptation="stan"``: blackjax's window adaptation, from the identity metric and
    ``step_size``. ``adaptation="scale_free"``: the same schedule from the curvature's metric
    (:func:`laplace_inverse_mass_matrix`) and the step size :func:`find_step_size` finds
    there, each window regularised towards the previous one (:func:`welford_metric`).
    """

    def engine(options: dict, initial_metric: jax.Array) -> tuple[Callable, Callable, Callable]:
        # (init, update, final) of blackjax's staged window adaptation; ``initial_metric``
        # (shape (d,)) is read by ``init`` only
        dense = options.get("dense_mass", False)
        adaptation = options.get("adaptation", "stan")
        if adaptation == "stan":
            core = lookup_recipe("welford_dense" if dense else "welford_diag").build_core()
        elif adaptation == "scale_free":
            core = welford_metric(not dense, initial_metric)
        else:
            raise ValueError(f"adaptation must be one of {ADAPTATIONS}, got {adaptation!r}.")
        return _make_engine(core, target_acceptance_rate=options["target_accept"])

    def init(rng_key: PRNGKey, position: PyTree, logdensity_fn: Callable, options: dict):
        step_size = options.get("step_size", 1.0)
        metric = jnp.ones(_flat_size(position))
        if options.get("adaptation", "stan") == "scale_free":
            metric = laplace_inverse_mass_matrix(logdensity_fn, position)
            dense = options.get("dense_mass", False)
            step_size = find_step_size(
                rng_key,
                _finite_only(module.build_kernel()),
                module.init(position, logdensity_fn),
                logdensity_fn,
                step_size,
                jnp.diag(metric) if dense else metric,
                options["target_accept"],
                **{name: options[name] for name in option_names},
            )
        state = engine(options, metric)[0](position, step_size)
        # not weakly typed: the state a step returns must have the types it was given
        dtype = state.ss_state.log_step_size.dtype
        return state._replace(step_size=jnp.asarray(state.step_size, dtype))

    def size_of(state: Any) -> jax.Array:  # update and final read only its size
        return jnp.ones(state.inverse_mass_matrix.shape[0])

    def update(state: Any, stage: jax.Array, chain_state: Any, info: Any, options: dict):
        adapt = engine(options, size_of(state))[1]
        stage = (stage[0], stage[1].astype(bool))
        position, grad = chain_state.position, chain_state.logdensity_grad
        return adapt(state, stage, position, grad, info.acceptance_rate)

    def final(state: Any, options: dict) -> dict:
        step_size, inverse_mass_matrix = engine(options, size_of(state))[2](state)
        step_size = jnp.asarray(step_size, state.ss_state.log_step_size.dtype)  # not weak
        return {"step_size": step_size, "inverse_mass_matrix": inverse_mass_matrix}

    def parameters(state: Any) -> dict:
        return {"step_size": state.step_size, "inverse_mass_matrix": state.inverse_mass_matrix}

    def schedule(num_steps: int) -> jax.Array:
        return jnp.asarray(build_schedule(num_steps), jnp.int32).reshape(num_steps, 2)

    return Adaptation(init, parameters, update, final, schedule)


def _hmc_parameters(position: PyTree, options: dict) -> dict:
    return {
        "step_size": jnp.asarray(options["step_size"], jnp.float32),
        "inverse_mass_matrix": _identity_metric(position, options.get("dense_mass", False)),
    }


def _adjusted_stats(state: Any, info: Any) -> dict:
    return {
        "lp": state.logdensity,
        "acceptance_rate": info.acceptance_rate,
        "n_grad_evals": jnp.ones((), jnp.int32),
    }


def _hmc_stats(state: Any, info: Any) -> dict:
    return {
        "lp": state.logdensity,
        "acceptance_rate": info.acceptance_rate,
        "diverging": info.is_divergent,
        "energy": info.energy,
        "n_steps": info.num_integration_steps,
        "n_grad_evals": info.num_integration_steps,
    }


def _nuts_stats(state: Any, info: Any) -> dict:
    return {**_hmc_stats(state, info), "tree_depth": info.num_trajectory_expansions}


def _blackjax_init(module: Any) -> Callable:
    def init(position: PyTree, logdensity_fn: Callable, rng_key: PRNGKey) -> Any:
        del rng_key
        return module.init(position, logdensity_fn)

    return init


def _finite_only(kernel: Callable) -> Callable:
    """``kernel`` that never moves to a state whose log density is not finite: such a state is
    replaced by the current one, with acceptance 0 and, where the info has them, not accepted
    and divergent. (blackjax 1.7.1 maps a NaN energy difference to a rejection but accepts a
    proposal of energy -inf, which a float32 quadratic form overflowing to -inf at a diverged
    HMC trajectory's end produces.)"""

    def finite_kernel(rng_key, state, logdensity_fn, *args, **kwargs):
        new_state, info = kernel(rng_key, state, logdensity_fn, *args, **kwargs)
        ok = jnp.isfinite(new_state.logdensity)
        new_state = tree_where(ok, new_state, state)
        fields = {"acceptance_rate": jnp.where(ok, info.acceptance_rate, 0.0)}
        if "is_accepted" in info._fields:
            fields["is_accepted"] = info.is_accepted & ok
        if "is_divergent" in info._fields:
            fields["is_divergent"] = info.is_divergent | ~ok
        return new_state, info._replace(**fields)

    return finite_kernel


def _kernel_builder(
    build_kernel: Callable[[], Callable],
    parameter_names: tuple[str, ...],
    *,
    defaulted: tuple[str, ...] = (),
    keywords: tuple[str, ...] = (),
) -> Callable[[dict], Callable]:
    """A :attr:`Sampler.build_kernel` around a blackjax-style ``build_kernel()``.

    The built ``kernel(rng_key, state, target_fn, parameters)`` calls the low-level kernel as
    ``kernel(rng_key, state, target_fn, *args, **kwargs)``: ``args`` are the ``parameter_names``
    entries of ``parameters`` in order, then each ``defaulted`` name, from ``parameters`` when
    present and from the options otherwise; ``kwargs`` are the ``keywords`` options.
    """

    def build(options: dict) -> Callable:
        kernel = build_kernel()
        fallbacks = {name: options[name] for name in defaulted}
        static = {name: options[name] for name in keywords}

        def parameterized_kernel(rng_key, state, target_fn, parameters):
            args = [parameters[name] for name in parameter_names]
            args += [parameters.get(name, value) for name, value in fallbacks.items()]
            return kernel(rng_key, state, target_fn, *args, **static)

        return parameterized_kernel

    return build


def _window_adapted(
    module: Any, *, defaulted: tuple[str, ...] = (), keywords: tuple[str, ...] = ()
) -> dict:
    """The :func:`register_sampler` arguments ``init``, ``build_kernel``, ``parameters`` and
    ``adaptation`` of a blackjax kernel ``kernel(..., step_size, inverse_mass_matrix, ...)`` with
    Stan's window adaptation, the kernel never moving to a non-finite log density
    (:func:`_finite_only`); ``defaulted`` and ``keywords`` as in :func:`_kernel_builder`, and
    both passed on to the adaptation."""
    return {
        "init": _blackjax_init(module),
        "build_kernel": _kernel_builder(
            lambda: _finite_only(module.build_kernel()),
            ("step_size", "inverse_mass_matrix"),
            defaulted=defaulted,
            keywords=keywords,
        ),
        "parameters": _hmc_parameters,
        "adaptation": _window_adaptation(module, defaulted + keywords),
    }


register_sampler(
    "nuts",
    stats=_nuts_stats,
    defaults={
        "target_accept": 0.8,
        "max_num_doublings": 10,
        "dense_mass": False,
        "step_size": 1.0,
        "adaptation": "stan",
    },
    **_window_adapted(blackjax.nuts, keywords=("max_num_doublings",)),
)
register_sampler(
    "hmc",
    stats=_hmc_stats,
    defaults={
        "target_accept": 0.8,
        "num_integration_steps": 16,
        "dense_mass": False,
        "step_size": 0.1,
        "adaptation": "scale_free",
    },
    **_window_adapted(blackjax.hmc, defaulted=("num_integration_steps",)),
)


class _Barker:
    r"""blackjax's Barker kernel, preconditioned by an inverse mass matrix as the others are.

    blackjax 1.7's ``barker`` scales its proposal by :math:`M^{1/2}` of the matrix it is given
    (its ``mass_matrix_sqrt``) where Livingstone & Zanella (2022, Appendix G) scale by the
    square root of the posterior covariance, :math:`M^{-1/2}`: handed the window adaptation's
    estimate of the covariance, its steps shrink along the wide directions and grow along the
    narrow ones. The chain is still invariant (the acceptance ratio uses the same matrix), only
    badly preconditioned. This wrapper passes it the inverse, so ``inverse_mass_matrix`` (shape
    ``(d,)`` or ``(d, d)``) means what it means for HMC and MALA: the proposal is
    :math:`y = x + \Sigma^{1/2} b z` with :math:`\Sigma` = ``inverse_mass_matrix``. A NaN
    acceptance rate (a proposal where the log density is NaN, always rejected) is reported as 0.
    """

    init = staticmethod(blackjax.barker.init)

    @staticmethod
    def build_kernel() -> Callable:
        kernel = blackjax.barker.build_kernel()

        def barker_kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix):
            if jnp.ndim(inverse_mass_matrix) == 1:
                mass_matrix = 1.0 / inverse_mass_matrix
            else:
                mass_matrix = jnp.linalg.inv(inverse_mass_matrix)
            state, info = kernel(rng_key, state, logdensity_fn, step_size, mass_matrix)
            # A proposal where the log density is NaN is rejected (blackjax's Bernoulli draw
            # at probability NaN), but its acceptance rate is NaN, which would poison dual
            # averaging for the rest of the warm-up: it is 0.
            rate = jnp.nan_to_num(info.acceptance_rate, nan=0.0)
            return state, info._replace(acceptance_rate=rate)

        return barker_kernel


# Acceptance targets: 0.574 is MALA's optimal rate (Roberts & Rosenthal 1998); Barker's
# efficiency is flat over about 0.4-0.57 (Livingstone & Zanella 2022, Sec. 4), 0.4 is at the
# robust end.
register_sampler(
    "mala",
    stats=_adjusted_stats,
    defaults={
        "target_accept": 0.574,
        "dense_mass": False,
        "step_size": 0.1,
        "adaptation": "scale_free",
    },
    grads_per_step=1,
    default_init="optimize",
    **_window_adapted(mala_module),
)
register_sampler(
    "barker",
    stats=_adjusted_stats,
    defaults={
        "target_accept": 0.4,
        "dense_mass": False,
        "step_size": 0.5,
        "adaptation": "scale_free",
    },
    grads_per_step=1,
    default_init="optimize",
    **_window_adapted(_Barker),
)


# --------------------------------------------------------------------------------------------
# Microcanonical Langevin (blackjax MCLMC with its L and step-size tuner).


def _mclmc_init(position: PyTree, logdensity_fn: Callable, rng_key: PRNGKey) -> Any:
    return blackjax.mcmc.mclmc.init(position, logdensity_fn, rng_key)


def _mclmc_parameters(position: PyTree, options: dict) -> dict:
    d = _flat_size(position)
    return {
        "L": jnp.asarray(options["L"] if options["L"] is not None else d**0.5, jnp.float32),
        "step_size": jnp.asarray(options["step_size"], jnp.float32),
        "inverse_mass_matrix": jnp.ones(d),
    }


def _mclmc_warmup(rng_key, position, logdensity_fn, num_steps, options):
    init_key, tune_key = jax.random.split(rng_key)
    state = _mclmc_init(position, logdensity_fn, init_key)
    params = None
    if options["diagonal_preconditioning"]:
        # Start the tuner in the curvature's units (blackjax's first L and step size, sqrt(d)
        # and sqrt(d) / 4, assume unit scales), not the identity's.
        d = _flat_size(position)
        params = blackjax.adaptation.mclmc_adaptation.MCLMCAdaptationState(
            jnp.sqrt(d), 0.25 * jnp.sqrt(d), laplace_inverse_mass_matrix(logdensity_fn, position)
        )
    # The tuner spends fractions of "the number of sampling steps"; these fractions add up
    # to about num_steps tuning steps (the second stage grows by 1/3 with preconditioning).
    state, params, _ = blackjax.mclmc_find_L_and_step_size(
        mclmc_kernel=blackjax.mcmc.mclmc.build_kernel(),
        num_steps=num_steps,
        state=state,
        rng_key=tune_key,
        logdensity_fn=logdensity_fn,
        frac_tune1=0.4,
        frac_tune2=0.3,
        frac_tune3=0.2,
        diagonal_preconditioning=options["diagonal_preconditioning"],
        params=params,
    )
    return state, {
        "L": params.L,
        "step_size": params.step_size,
        "inverse_mass_matrix": params.inverse_mass_matrix,
    }


def _mclmc_stats(state: Any, info: Any) -> dict:
    # The default isokinetic McLachlan integrator evaluates the gradient twice per step.
    return {
        "lp": state.logdensity,
        "energy_change": info.energy_change,
        "n_grad_evals": jnp.full((), 2, jnp.int32),
    }


register_sampler(
    "mclmc",
    init=_mclmc_init,
    build_kernel=_kernel_builder(
        blackjax.mcmc.mclmc.build_kernel, ("inverse_mass_matrix", "L", "step_size")
    ),
    stats=_mclmc_stats,
    defaults={"step_size": 0.5, "L": None, "diagonal_preconditioning": True},
    parameters=_mclmc_parameters,
    warmup=_mclmc_warmup,
    grads_per_step=2,
    is_exact=False,  # no Metropolis correction; the tuner keeps the energy error (bias) small
    default_init="optimize",
)


# --------------------------------------------------------------------------------------------
# Unadjusted, gradient-only kernels: target_fn is grad log p.


def _position_init(position: PyTree, grad_fn: Callable, rng_key: PRNGKey) -> PositionState:
    del grad_fn, rng_key
    return PositionState(position)


def _stochastic_gradient_builder(
    module: Any, option_names: tuple[str, ...], *, build_options: tuple[str, ...] = ()
) -> Callable[[dict], Callable]:
    """A :attr:`Sampler.build_kernel` around blackjax's ``sgld`` or ``sghmc``, on the full gradient.

    The low-level kernel, ``module.build_kernel(**build_options)``, is called as
    ``kernel(rng_key, position, grad_estimator, None, step_size, *options)`` with the
    ``option_names`` options in order; ``n_grad_evals`` is ``num_integration_steps`` (else 1).
    """

    def build(options: dict) -> Callable:
        kernel = module.build_kernel(**{name: options[name] for name in build_options})
        static = [options[name] for name in option_names]
        num_grad_evals = options.get("num_integration_steps", 1)

        def stochastic_gradient_kernel(rng_key, state, grad_fn, parameters):
            position = kernel(
                rng_key,
                state.position,
                lambda x, _: grad_fn(x),
                None,
                parameters["step_size"],
                *static,
            )
            return PositionState(position), {
                "n_grad_evals": jnp.full((), num_grad_evals, jnp.int32)
            }

        return stochastic_gradient_kernel

    return build


def _info_stats(state: Any, info: dict) -> dict:
    return dict(info)


def _ula_stats(state: Any, info: Any) -> dict:
    return {"grad_norm": info.grad_norm, "n_grad_evals": jnp.ones((), jnp.int32)}


#: :func:`register_sampler` for an unadjusted kernel driven by ``grad_fn`` alone.
_register_gradient_only = functools.partial(
    register_sampler, init=_position_init, stats=_info_stats, needs_logdensity=False, is_exact=False
)

_register_gradient_only(
    "ula",
    init=lambda position, grad_fn, rng_key: ula_module.init(position),
    build_kernel=_kernel_builder(ula_module.build_kernel, ("step_size",)),
    stats=_ula_stats,
    defaults={"step_size": 0.01},
    grads_per_step=1,
)
_register_gradient_only(
    "sgld",
    build_kernel=_stochastic_gradient_builder(blackjax.sgld, ("temperature",)),
    defaults={"step_size": 0.01, "temperature": 1.0},
    grads_per_step=1,
)
_register_gradient_only(
    "sghmc",
    build_kernel=_stochastic_gradient_builder(
        blackjax.sghmc, ("num_integration_steps", "temperature"), build_options=("alpha",)
    ),
    defaults={"step_size": 0.05, "num_integration_steps": 10, "alpha": 0.5, "temperature": 1.0},
)
