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
) -> Sampler:
    """Add a sampler to the registry and return it.

    See :class:`Sampler` for the meaning of each argument. Registering a name twice is a
    ``ValueError``.

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
    if name in SAMPLERS:
        raise ValueError(
            f"a sampler named {name!r} is already registered; registered samplers: {samplers()}."
        )
    defaults = dict(defaults or {})
    if parameters is None:

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


def _window_warmup(module: Any, kernel_options: Callable[[dict], dict]) -> Callable:
    """Window adaptation (step size by dual averaging, diagonal or dense mass matrix)."""

    def warmup(
        rng_key: PRNGKey, position: PyTree, logdensity_fn: Callable, num_steps: int, options: dict
    ) -> tuple[Any, dict]:
        adaptation = blackjax.window_adaptation(
            module,
            logdensity_fn,
            is_mass_matrix_diagonal=not options.get("dense_mass", False),
            initial_step_size=options.get("step_size", 1.0),
            target_acceptance_rate=options["target_accept"],
            **kernel_options(options),
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


def _build_nuts(options: dict) -> Callable:
    kernel = blackjax.nuts.build_kernel()
    max_num_doublings = options["max_num_doublings"]

    def nuts_kernel(rng_key, state, logdensity_fn, parameters):
        return kernel(
            rng_key,
            state,
            logdensity_fn,
            parameters["step_size"],
            parameters["inverse_mass_matrix"],
            max_num_doublings=max_num_doublings,
        )

    return nuts_kernel


def _build_hmc(options: dict) -> Callable:
    kernel = blackjax.hmc.build_kernel()

    def hmc_kernel(rng_key, state, logdensity_fn, parameters):
        return kernel(
            rng_key,
            state,
            logdensity_fn,
            parameters["step_size"],
            parameters["inverse_mass_matrix"],
            parameters.get("num_integration_steps", options["num_integration_steps"]),
        )

    return hmc_kernel


def _build_barker(options: dict) -> Callable:
    kernel = blackjax.barker.build_kernel()

    def barker_kernel(rng_key, state, logdensity_fn, parameters):
        return kernel(
            rng_key,
            state,
            logdensity_fn,
            parameters["step_size"],
            parameters["inverse_mass_matrix"],
        )

    return barker_kernel


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


def _build_mala(options: dict) -> Callable:
    kernel = blackjax.mala.build_kernel()

    def mala_kernel(rng_key, state, logdensity_fn, parameters):
        return kernel(rng_key, state, logdensity_fn, parameters["step_size"])

    return mala_kernel


def _drop_metric(warmup: Callable) -> Callable:
    def mala_warmup(rng_key, position, logdensity_fn, num_steps, options):
        state, parameters = warmup(rng_key, position, logdensity_fn, num_steps, options)
        return state, {"step_size": parameters["step_size"]}

    return mala_warmup


register_sampler(
    "nuts",
    init=_blackjax_init(blackjax.nuts),
    build_kernel=_build_nuts,
    stats=_nuts_stats,
    defaults={"target_accept": 0.8, "max_num_doublings": 10, "dense_mass": False, "step_size": 1.0},
    parameters=_hmc_parameters,
    warmup=_window_warmup(blackjax.nuts, lambda o: {"max_num_doublings": o["max_num_doublings"]}),
)
register_sampler(
    "hmc",
    init=_blackjax_init(blackjax.hmc),
    build_kernel=_build_hmc,
    stats=_hmc_stats,
    defaults={
        "target_accept": 0.8,
        "num_integration_steps": 16,
        "dense_mass": False,
        "step_size": 0.1,
    },
    parameters=_hmc_parameters,
    warmup=_window_warmup(
        blackjax.hmc, lambda o: {"num_integration_steps": o["num_integration_steps"]}
    ),
)
register_sampler(
    "mala",
    init=_blackjax_init(blackjax.mala),
    build_kernel=_build_mala,
    stats=_adjusted_stats,
    defaults={"target_accept": 0.574, "step_size": 0.1},
    warmup=_drop_metric(_window_warmup(_MALAWithMetricSlot, lambda o: {})),
    grads_per_step=1,
)
register_sampler(
    "barker",
    init=_blackjax_init(blackjax.barker),
    build_kernel=_build_barker,
    stats=_adjusted_stats,
    defaults={"target_accept": 0.4, "dense_mass": False, "step_size": 0.5},
    parameters=_hmc_parameters,
    warmup=_window_warmup(blackjax.barker, lambda o: {}),
    grads_per_step=1,
)


# --------------------------------------------------------------------------------------------
# Microcanonical Langevin (blackjax MCLMC with its L and step-size tuner).


def _mclmc_init(position: PyTree, logdensity_fn: Callable, rng_key: PRNGKey) -> Any:
    return blackjax.mcmc.mclmc.init(position, logdensity_fn, rng_key)


def _build_mclmc(options: dict) -> Callable:
    kernel = blackjax.mcmc.mclmc.build_kernel()

    def mclmc_kernel(rng_key, state, logdensity_fn, parameters):
        return kernel(
            rng_key,
            state,
            logdensity_fn,
            parameters["inverse_mass_matrix"],
            parameters["L"],
            parameters["step_size"],
        )

    return mclmc_kernel


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
    build_kernel=_build_mclmc,
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


def _build_ula(options: dict) -> Callable:
    kernel = ula_module.build_kernel()

    def ula_kernel(rng_key, state, grad_fn, parameters):
        return kernel(rng_key, state, grad_fn, parameters["step_size"])

    return ula_kernel


def _build_sgld(options: dict) -> Callable:
    kernel = blackjax.sgld.build_kernel()
    temperature = options["temperature"]

    def sgld_kernel(rng_key, state, grad_fn, parameters):
        position = kernel(
            rng_key,
            state.position,
            lambda x, _: grad_fn(x),
            None,
            parameters["step_size"],
            temperature,
        )
        return PositionState(position), {"n_grad_evals": jnp.ones((), jnp.int32)}

    return sgld_kernel


def _build_sghmc(options: dict) -> Callable:
    kernel = blackjax.sghmc.build_kernel(alpha=options["alpha"])
    num_integration_steps = options["num_integration_steps"]
    temperature = options["temperature"]

    def sghmc_kernel(rng_key, state, grad_fn, parameters):
        position = kernel(
            rng_key,
            state.position,
            lambda x, _: grad_fn(x),
            None,
            parameters["step_size"],
            num_integration_steps,
            temperature,
        )
        return PositionState(position), {
            "n_grad_evals": jnp.full((), num_integration_steps, jnp.int32)
        }

    return sghmc_kernel


def _info_stats(state: Any, info: dict) -> dict:
    return dict(info)


register_sampler(
    "ula",
    init=lambda position, grad_fn, rng_key: ula_module.init(position),
    build_kernel=_build_ula,
    stats=lambda state, info: {
        "grad_norm": info.grad_norm,
        "n_grad_evals": jnp.ones((), jnp.int32),
    },
    defaults={"step_size": 0.01},
    grads_per_step=1,
    needs_logdensity=False,
    is_exact=False,
)
register_sampler(
    "sgld",
    init=_position_init,
    build_kernel=_build_sgld,
    stats=_info_stats,
    defaults={"step_size": 0.01, "temperature": 1.0},
    grads_per_step=1,
    needs_logdensity=False,
    is_exact=False,
)
register_sampler(
    "sghmc",
    init=_position_init,
    build_kernel=_build_sghmc,
    stats=_info_stats,
    defaults={"step_size": 0.05, "num_integration_steps": 10, "alpha": 0.5, "temperature": 1.0},
    grads_per_step=None,
    needs_logdensity=False,
    is_exact=False,
)
