"""The sampler registry: one dict from a name to a :class:`Sampler`.

A :class:`Sampler` holds blackjax's two levels: static ``options`` (hashable, fixed when the
kernel is built) and per-chain ``parameters`` (arrays, set by warm-up: step size, mass matrix, ...).
Every kernel is called as ``kernel(rng_key, state, target_fn, parameters)``, where ``target_fn``
is the log density for samplers with ``needs_logdensity=True`` (Metropolis-adjusted kernels) and
the gradient of the log density otherwise (unadjusted kernels, which EM distillation drives with
diffusion scores). Kernels are called on one chain; callers ``vmap`` over chains.

Registered here: blackjax's ``nuts``, ``hmc``, ``mala``, ``barker`` (Stan-style window adaptation),
``mclmc`` (the MCLMC tuner), ``sgld`` and ``sghmc`` (driven by the full gradient), and emdppl's
own unadjusted Langevin ``ula``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp

from emdppl.base import PRNGKey, PyTree
from emdppl.kernels import ula as ula_module

__all__ = ["SAMPLERS", "PositionState", "Sampler", "get_sampler", "register_sampler", "samplers"]


class PositionState(NamedTuple):
    """Chain state of the stochastic-gradient kernels, which carry nothing but the position."""

    position: PyTree


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
        for one chain, or ``None`` when the sampler has no adaptation.
    grads_per_step
        Gradient evaluations per step, or ``None`` when it varies (read ``n_grad_evals``).
    needs_logdensity
        ``True`` when ``target_fn`` is a log density; ``False`` when it is its gradient.
    is_exact
        ``True`` for Metropolis-adjusted kernels (invariant for the target); ``False`` for
        unadjusted ones, whose stationary law carries a step-size bias.
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


def _window_warmup(module: Any, option_names: tuple[str, ...] = ()) -> Callable:
    """Window adaptation (step size by dual averaging, diagonal or dense mass matrix); the
    ``option_names`` options are passed on to the kernel."""

    def warmup(
        rng_key: PRNGKey, position: PyTree, logdensity_fn: Callable, num_steps: int, options: dict
    ) -> tuple[Any, dict]:
        adaptation = blackjax.window_adaptation(
            module,
            logdensity_fn,
            is_mass_matrix_diagonal=not options.get("dense_mass", False),
            initial_step_size=options.get("step_size", 1.0),
            target_acceptance_rate=options["target_accept"],
            **{name: options[name] for name in option_names},
        )
        (result, _) = adaptation.run(rng_key, position, num_steps)
        return result.state, dict(result.parameters)

    return warmup


def _hmc_parameters(position: PyTree, options: dict) -> dict:
    d = _flat_size(position)
    eye = jnp.eye(d) if options.get("dense_mass", False) else jnp.ones(d)
    return {"step_size": jnp.asarray(options["step_size"], jnp.float32), "inverse_mass_matrix": eye}


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


class _MALAWithMetricSlot:
    """blackjax's MALA seen by the window adaptation, which passes a mass matrix.

    MALA in blackjax has no mass matrix, so only the step size is adapted (dual averaging on
    the window schedule); the mass-matrix estimate is computed and dropped.
    """

    init = staticmethod(blackjax.mala.init)

    @staticmethod
    def build_kernel() -> Callable:
        kernel = blackjax.mala.build_kernel()

        def mala_kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix=None):
            del inverse_mass_matrix
            return kernel(rng_key, state, logdensity_fn, step_size)

        return mala_kernel


def _drop_metric(warmup: Callable) -> Callable:
    def mala_warmup(rng_key, position, logdensity_fn, num_steps, options):
        state, parameters = warmup(rng_key, position, logdensity_fn, num_steps, options)
        return state, {"step_size": parameters["step_size"]}

    return mala_warmup


def _window_adapted(
    module: Any, *, defaulted: tuple[str, ...] = (), keywords: tuple[str, ...] = ()
) -> dict:
    """The :func:`register_sampler` arguments ``init``, ``build_kernel``, ``parameters`` and
    ``warmup`` of a blackjax kernel ``kernel(..., step_size, inverse_mass_matrix, ...)`` with
    Stan's window adaptation; ``defaulted`` and ``keywords`` as in :func:`_kernel_builder`, and
    both passed on to the adaptation."""
    return {
        "init": _blackjax_init(module),
        "build_kernel": _kernel_builder(
            module.build_kernel,
            ("step_size", "inverse_mass_matrix"),
            defaulted=defaulted,
            keywords=keywords,
        ),
        "parameters": _hmc_parameters,
        "warmup": _window_warmup(module, defaulted + keywords),
    }


register_sampler(
    "nuts",
    stats=_nuts_stats,
    defaults={"target_accept": 0.8, "max_num_doublings": 10, "dense_mass": False, "step_size": 1.0},
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
    },
    **_window_adapted(blackjax.hmc, defaulted=("num_integration_steps",)),
)
register_sampler(
    "mala",
    init=_blackjax_init(blackjax.mala),
    build_kernel=_kernel_builder(blackjax.mala.build_kernel, ("step_size",)),
    stats=_adjusted_stats,
    defaults={"target_accept": 0.574, "step_size": 0.1},
    warmup=_drop_metric(_window_warmup(_MALAWithMetricSlot)),
    grads_per_step=1,
)
register_sampler(
    "barker",
    stats=_adjusted_stats,
    defaults={"target_accept": 0.4, "dense_mass": False, "step_size": 0.5},
    grads_per_step=1,
    **_window_adapted(blackjax.barker),
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
