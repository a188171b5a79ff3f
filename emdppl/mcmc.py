"""MCMC as an :class:`~emdppl.base.Algorithm`: any registered sampler, many chains at once.

``MCMC`` holds the settings; :func:`mcmc_algorithm` builds the pure ``(init, step)`` pair whose
step advances every chain by one kernel step (``jax.vmap`` over chains); :meth:`MCMC.sample`
runs warm-up and sampling on a :class:`~emdppl.target.Target` and returns arrays with leading
``(chain, draw)`` axes. Where the chains start is part of the settings (``init``): NumPyro's
strategies (uniform, median, given values) or an optimisation from the uniform draws
(:func:`emdppl.initialization.optimize_positions`), by default whichever suits the sampler
(:attr:`emdppl.samplers.Sampler.default_init`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from emdppl.base import Algorithm, PRNGKey, PyTree, as_key, tree_where
from emdppl.diagnostics import check_constrained, check_mcmc, warn
from emdppl.driver import NUM_CHUNKS, check_checkpoint_dir, common_chunk_length, run
from emdppl.inference_data import to_arviz
from emdppl.initialization import optimize_positions
from emdppl.samplers import INIT_STRATEGIES, Sampler, get_sampler
from emdppl.sharding import Devices, chain_mesh, describe, replicate, shard_chains, to_host
from emdppl.target import Target
from emdppl.timing import stopwatch

if TYPE_CHECKING:
    from emdppl.problem import Problem

__all__ = ["DEFAULT_INIT_RADIUS", "MCMC", "MCMCResult", "MCMCState", "mcmc_algorithm"]

#: The radius :meth:`emdppl.Problem.target` draws initial positions with.
DEFAULT_INIT_RADIUS = 2.0


class MCMCState(NamedTuple):
    """Per-chain kernel states and kernel parameters (both with a leading chain axis); while a
    step-by-step warm-up (:class:`~emdppl.samplers.Adaptation`) is part of the run, also its
    per-chain state and the number of steps taken (a scalar shared by all chains)."""

    chain_state: Any
    parameters: dict
    adaptation: Any = None
    step: Any = None


def _target_fn(sampler: Sampler, logdensity_fn: Callable) -> Callable:
    return logdensity_fn if sampler.needs_logdensity else jax.grad(logdensity_fn)


class _MCMCStep(eqx.Module):
    """``step(rng_key, state)``: one kernel step of every chain; info = (position, stats).

    With a ``schedule`` (the warm-up's, one row per warm-up step) the first
    ``len(schedule)`` steps run the kernel with the adaptation's current parameters and
    update it, the last of them setting the parameters every later step uses: warm-up and
    sampling are one step function, so one compiled kernel.
    """

    sampler_name: str = eqx.field(static=True)
    options: tuple = eqx.field(static=True)
    logdensity_fn: Callable
    schedule: jax.Array | None = None

    def __call__(self, rng_key: PRNGKey, state: MCMCState) -> tuple[MCMCState, tuple]:
        sampler = get_sampler(self.sampler_name)
        options = dict(self.options)
        kernel = sampler.build_kernel(options)
        target_fn = _target_fn(sampler, self.logdensity_fn)
        adaptation = sampler.adaptation if self.schedule is not None else None
        if adaptation is not None:  # one predicate for all chains: a real branch under vmap
            is_warmup = state.step < self.schedule.shape[0]
            stage = self.schedule[jnp.minimum(state.step, self.schedule.shape[0] - 1)]

        def one_chain(key, chain_state, parameters, adapted):
            if adaptation is not None:
                parameters = tree_where(is_warmup, adaptation.parameters(adapted), parameters)
            chain_state, info = kernel(key, chain_state, target_fn, parameters)
            if adaptation is not None:

                def adapt(carry):
                    adapted = adaptation.update(carry[0], stage, chain_state, info, options)
                    return adapted, adaptation.final(adapted, options)

                adapted, parameters = jax.lax.cond(
                    is_warmup, adapt, lambda carry: carry, (adapted, parameters)
                )
            stats = sampler.stats(chain_state, info)
            return chain_state, parameters, adapted, (chain_state.position, stats)

        num_chains = jax.tree.leaves(state.parameters)[0].shape[0]
        keys = jax.random.split(rng_key, num_chains)
        chain_state, parameters, adapted, info = jax.vmap(one_chain)(
            keys, state.chain_state, state.parameters, state.adaptation
        )
        step = None if state.step is None else state.step + 1
        return MCMCState(chain_state, parameters, adapted, step), info


class _MCMCInit(eqx.Module):
    """``init(position, rng_key)``: kernel states with default parameters (no warm-up), or
    the adaptation's initial state and parameters (with a warm-up ``schedule``)."""

    sampler_name: str = eqx.field(static=True)
    options: tuple = eqx.field(static=True)
    logdensity_fn: Callable
    schedule: jax.Array | None = None

    def __call__(self, position: PyTree, rng_key: PRNGKey) -> MCMCState:
        sampler = get_sampler(self.sampler_name)
        options = dict(self.options)
        target_fn = _target_fn(sampler, self.logdensity_fn)
        num_chains = jax.tree.leaves(position)[0].shape[0]
        keys = jax.random.split(rng_key, num_chains)
        chain_state = jax.vmap(lambda x, k: sampler.init(x, target_fn, k))(position, keys)
        if self.schedule is None:
            parameters = jax.vmap(lambda x: sampler.parameters(x, options))(position)
            return MCMCState(chain_state, parameters)
        adaptation = sampler.adaptation
        keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_chains)
        adapted = jax.vmap(lambda k, x: adaptation.init(k, x, self.logdensity_fn, options))(
            keys, position
        )
        parameters = jax.vmap(lambda a: adaptation.final(a, options))(adapted)
        return MCMCState(chain_state, parameters, adapted, jnp.zeros((), jnp.int32))


def mcmc_algorithm(
    sampler: str, logdensity_fn: Callable, *, num_warmup: int = 0, **options: Any
) -> Algorithm:
    """The MCMC ``Algorithm`` of a registered sampler on ``logdensity_fn``, over many chains.

    ``init(position, rng_key)`` takes positions with a leading ``(num_chains,)`` axis and uses
    the sampler's default parameters; ``step(rng_key, state)`` advances every chain and reports
    ``(position, stats)`` per chain. With ``num_warmup > 0`` (a sampler with an
    :class:`~emdppl.samplers.Adaptation`) the first ``num_warmup`` steps are its warm-up,
    adapting the parameters, and the steps after sample with the adapted ones.

    Examples
    --------
    >>> alg = emdppl.mcmc_algorithm("mala", lambda x: -0.5 * x @ x, step_size=0.5)
    >>> state = alg.init(jnp.zeros((4, 2)), jax.random.key(0))
    >>> state, (positions, stats) = alg.step(jax.random.key(1), state)
    """
    sampler_obj = get_sampler(sampler)
    frozen = tuple(sorted(sampler_obj.options(**options).items()))
    schedule = None
    if num_warmup > 0:
        if sampler_obj.adaptation is None:
            raise ValueError(
                f"mcmc_algorithm: sampler {sampler!r} has no step-by-step warm-up; use "
                "emdppl.MCMC, which runs any sampler's warm-up, or num_warmup=0."
            )
        schedule = sampler_obj.adaptation.schedule(num_warmup)
    return Algorithm(
        init=_MCMCInit(sampler, frozen, logdensity_fn, schedule),
        step=_MCMCStep(sampler, frozen, logdensity_fn, schedule),
    )


@eqx.filter_jit
def _warmup(
    sampler_name: str,
    options: tuple,
    num_steps: int,
    logdensity_fn: Callable,
    position: PyTree,
    keys,
) -> MCMCState:
    sampler = get_sampler(sampler_name)

    def one_chain(key, x):
        return sampler.warmup(key, x, logdensity_fn, num_steps, dict(options))

    chain_state, parameters = jax.vmap(one_chain)(keys, position)
    return MCMCState(chain_state, parameters)


def _warmup_records(
    num_warmup: int, thinning: int, num_records: int, num_chunks: int
) -> tuple[int, int | None]:
    """``(warm-up records, chunk length)`` for a warm-up of at least ``num_warmup`` steps
    before ``num_records`` thinned draws: the fewest whole records (at most 10% more than
    needed; the steps past ``num_warmup`` sample with the adapted parameters and are dropped)
    for which both phases share a chunk length (:func:`emdppl.driver.common_chunk_length`),
    else the fewest records and ``None``."""
    fewest = -(-num_warmup // thinning)
    for records in range(fewest, fewest + fewest // 10 + 1):
        length = common_chunk_length((records, num_records), num_chunks)
        if length is not None:
            return records, length
    return fewest, None


class MCMCResult(NamedTuple):
    """Draws and statistics of an MCMC run.

    Attributes
    ----------
    positions
        Unconstrained draws, leaves of shape ``(chain, draw, ...)``.
    stats
        Per-draw statistics (see :class:`~emdppl.samplers.Sampler`), ``(chain, draw)``.
    parameters
        Kernel parameters after warm-up, leading axis ``chain``.
    state
        The final :class:`MCMCState` (to continue sampling).
    timing
        ``{"warmup_seconds", "sampling_seconds"}`` wall-clock, compilation included (warm-up
        includes drawing or optimising the initial positions).
    warnings
        The problems :func:`emdppl.diagnostics.check_mcmc` found (empty: none).
    """

    positions: PyTree
    stats: dict
    parameters: dict
    state: MCMCState
    timing: dict
    warnings: list = []


class MCMC:
    """Settings of an MCMC run with a registered sampler.

    Parameters
    ----------
    sampler
        A name from :func:`emdppl.samplers` (``"nuts"``, ``"mala"``, ...).
    num_warmup
        Warm-up steps per chain, discarded: adaptation for samplers that have one, plain
        burn-in with the default parameters for the others (``ula``, ``sgld``, ``sghmc``).
    num_samples
        Kept draws per chain (after thinning).
    num_chains
        Chains run in parallel with ``jax.vmap``.
    thinning
        Keep every ``thinning``-th draw.
    init
        Where the chains start. ``"uniform"``: uniform in ``[-init_radius, init_radius]`` on the
        unconstrained scale (NumPyro's ``init_to_uniform``; the positions the target was built
        with when ``init_radius`` is 2); ``"median"``: the median of 15 prior draws per chain
        (``init_to_median``); a dict ``{site: value}`` of sampled sites' values on their
        constrained scale (``init_to_value``; in auxiliary form the sampled sites are
        ``theta_decentered``, ...); ``"optimize"``: from each chain's uniform draw, at most 200
        L-BFGS iterations on the log density, the chain starting at the first point of its path
        within ``d / 2`` of the path's best log density, in the typical set
        (:func:`emdppl.initialization.optimize_positions`). ``"median"``, a dict and a radius
        other than 2 redraw a NumPyro model's sites; ``"optimize"`` and ``"uniform"`` at radius 2
        work on any :class:`~emdppl.target.Target`, from its own positions. ``None``: the
        sampler's default (:attr:`~emdppl.samplers.Sampler.default_init`: ``"uniform"`` for
        nuts and hmc, ``"optimize"`` for mala, barker and mclmc).
    init_radius
        Half-width of the uniform draws.
    checkpoint_dir
        If given, sampling writes a checkpoint there after every chunk and a run that finds one
        resumes from it (see :func:`emdppl.run`); warm-up is not checkpointed and is redone.
    devices
        Where the chains run (:func:`emdppl.sharding.chain_mesh`): ``None`` (the default
        device), ``"all"``, an int (the first ``n`` of ``jax.devices()``), a list of devices or a
        one-axis ``jax.sharding.Mesh``. Chains are split evenly over a ``"chain"`` mesh axis
        (``num_chains`` must be a multiple of the number of devices), the data replicated; the
        draws and InferenceData are the same as on one device (``attrs["devices"]`` lists the
        devices). A Pyro model's log density runs on the host and gains nothing from devices.
    **sampler_options
        Options of the sampler, e.g. ``target_accept`` for NUTS or ``step_size`` for ULA.

    Examples
    --------
    >>> mala = emdppl.MCMC("mala", num_warmup=2000, num_chains=8)
    >>> idata = emdppl.infer(model, mala, model_kwargs=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        sampler: str = "nuts",
        *,
        num_warmup: int = 1000,
        num_samples: int = 1000,
        num_chains: int = 4,
        thinning: int = 1,
        init: str | Mapping | None = None,
        init_radius: float = 2.0,
        checkpoint_dir: str | None = None,
        devices: Devices = None,
        **sampler_options: Any,
    ) -> None:
        self.sampler = get_sampler(sampler).name
        for name, value, low in (
            ("num_warmup", num_warmup, 0),
            ("num_samples", num_samples, 1),
            ("num_chains", num_chains, 1),
            ("thinning", thinning, 1),
        ):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"MCMC: {name} must be an integer >= {low}, got {value!r}.")
        self.num_warmup = int(num_warmup)
        self.num_samples = int(num_samples)
        self.num_chains = int(num_chains)
        self.thinning = int(thinning)
        self.checkpoint_dir = checkpoint_dir
        self.options = get_sampler(sampler).options(**sampler_options)
        if init is None:
            init = get_sampler(sampler).default_init
        if isinstance(init, Mapping):
            init = dict(init)
        elif init not in INIT_STRATEGIES:
            raise ValueError(
                f"MCMC: init must be one of {INIT_STRATEGIES}, a dict of site values or None (the "
                f"sampler's default, {get_sampler(sampler).default_init!r}), got {init!r}."
            )
        if not isinstance(init_radius, (int, float, np.floating, np.integer)) or not (
            init_radius > 0
        ):
            raise ValueError(f"MCMC: init_radius must be a number > 0, got {init_radius!r}.")
        self.init = init
        self.init_radius = float(init_radius)
        chain_mesh(devices, self.num_chains)  # a bad spec fails here, before any tracing
        self.devices = devices

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        init = f"init={self.init!r}" if isinstance(self.init, str) else "init={...}"
        is_default_radius = self.init_radius == DEFAULT_INIT_RADIUS
        radius = "" if is_default_radius else f", init_radius={self.init_radius}"
        return (
            f"MCMC({self.sampler!r}, num_warmup={self.num_warmup}, num_samples={self.num_samples}, "
            f"num_chains={self.num_chains}, thinning={self.thinning}, {init}{radius}{opts})"
        )

    def initialize(self, rng_key: int | PRNGKey, target: Target) -> Target:
        """``target`` started where ``init`` says (see the class docstring); the target itself
        when ``init="uniform"`` at the default radius."""
        if self.init == "uniform" and self.init_radius == DEFAULT_INIT_RADIUS:
            return target
        drawn = "uniform" if self.init == "optimize" else self.init
        if drawn != "uniform" or self.init_radius != DEFAULT_INIT_RADIUS:
            target = target.with_init(drawn, rng_key, init_radius=self.init_radius)
        if self.init == "optimize":
            position, _ = optimize_positions(target.logdensity_fn, target.initial_position)
            target = target.with_initial_position(position)
        return target

    def sample(
        self,
        rng_key: int | PRNGKey,
        target: Target,
        *,
        progress_bar: bool = True,
        is_auxiliary: bool = True,
    ) -> MCMCResult:
        """Warm up and sample every chain of ``target`` (started at ``initial_position`` as
        :meth:`initialize` moves it by ``init``), then check the run as Stan does
        (:func:`emdppl.diagnostics.check_mcmc`: one warning listing every problem;
        ``is_auxiliary`` tells the divergence advice which form ran)."""
        sampler = get_sampler(self.sampler)
        frozen = tuple(sorted(self.options.items()))
        warmup_key, init_key, sample_key = jax.random.split(as_key(rng_key), 3)
        mesh = chain_mesh(self.devices, target.num_chains)
        check_checkpoint_dir(self.checkpoint_dir)  # before the warm-up
        logdensity_fn = replicate(target.logdensity_fn, mesh)
        adapting = self.num_warmup > 0 and sampler.adaptation is not None
        algorithm = mcmc_algorithm(
            self.sampler,
            logdensity_fn,
            num_warmup=self.num_warmup if adapting else 0,
            **self.options,
        )

        start = time.perf_counter()
        # fold_in: the strategy's key leaves the warm-up and sampling keys as they were
        position = self.initialize(jax.random.fold_in(init_key, 1), target).initial_position
        position = shard_chains(position, mesh)
        chunk_length = None
        if adapting:  # warm-up and sampling: one step function, one chunk length, one compile
            records, chunk_length = _warmup_records(
                self.num_warmup,
                self.thinning,
                self.num_samples,
                NUM_CHUNKS if progress_bar or self.checkpoint_dir is not None else 1,
            )
            num_warmup = records * self.thinning
            state = eqx.filter_jit(algorithm.init)(position, init_key)
            state, _ = run(
                warmup_key,
                algorithm,
                num_warmup,
                state,
                thinning=self.thinning,
                progress_bar=progress_bar,
                desc=f"{self.sampler} warmup",
                chunk_length=chunk_length,
                keep_trace=False,
            )
        elif self.num_warmup > 0 and sampler.warmup is not None:
            keys = shard_chains(jax.random.split(warmup_key, target.num_chains), mesh)
            with tqdm(total=1, desc=f"{self.sampler} warmup", disable=not progress_bar) as bar:
                state = _warmup(
                    self.sampler, frozen, self.num_warmup, logdensity_fn, position, keys
                )
                jax.block_until_ready(state)
                bar.update()
        else:  # no adaptation: burn in with the default parameters, draws discarded
            state = eqx.filter_jit(algorithm.init)(position, init_key)
            state, _ = run(
                warmup_key,
                algorithm,
                self.num_warmup,
                state,
                progress_bar=progress_bar,
                desc=f"{self.sampler} burn-in",
                keep_trace=False,
            )
        warmup_seconds = time.perf_counter() - start

        start = time.perf_counter()
        state, (positions, stats) = run(
            sample_key,
            algorithm,
            self.num_samples * self.thinning,
            state,
            thinning=self.thinning,
            progress_bar=progress_bar,
            desc=f"{self.sampler} sampling",
            checkpoint_dir=self.checkpoint_dir,
            chunk_length=chunk_length,
        )
        sampling_seconds = time.perf_counter() - start

        to_chain_major = lambda x: np.swapaxes(x, 0, 1)  # (draw, chain, ...) -> (chain, draw, ...)
        positions = jax.tree.map(to_chain_major, positions)
        stats = {k: to_chain_major(v) for k, v in stats.items()}
        parameters = jax.tree.map(to_host, state.parameters)
        if "step_size" in parameters:
            step_size = parameters["step_size"]
            stats["step_size"] = np.broadcast_to(
                step_size[:, None], (target.num_chains, self.num_samples)
            )
        problems = check_mcmc(
            positions,
            stats,
            self.sampler,
            is_auxiliary=is_auxiliary,
            max_tree_depth=self.options.get("max_num_doublings"),
            target_accept=self.options.get("target_accept"),
        )
        warn(problems, f"emdppl.MCMC({self.sampler!r})")
        return MCMCResult(
            positions,
            stats,
            parameters,
            state,
            {"warmup_seconds": warmup_seconds, "sampling_seconds": sampling_seconds},
            problems,
        )

    def infer(
        self, problem: Problem, *, rng_key: int | PRNGKey = 0, progress_bar: bool = True
    ) -> Any:
        """Sample ``problem``'s posterior and return InferenceData (every site the target's
        ``postprocess`` gives, ``sample_stats``); :func:`emdppl.infer` adds the model's groups
        (:func:`emdppl.inference_data.add_model_groups`)."""
        target_key, sample_key = jax.random.split(as_key(rng_key))
        with stopwatch() as watch:
            target = problem.target(self.num_chains, target_key)
            result = self.sample(
                sample_key, target, progress_bar=progress_bar, is_auxiliary=problem.is_auxiliary
            )
            posterior = target.postprocess(result.positions)
        constrained = check_constrained(posterior)
        warn(constrained, f"emdppl.MCMC({self.sampler!r})")
        attrs = {
            "algorithm": "mcmc",
            "sampler": self.sampler,
            "sampler_options": self.options,
            "auxiliary": int(problem.is_auxiliary),
            "num_warmup": self.num_warmup,
            "thinning": self.thinning,
            "sampler_parameters": result.parameters,
            "wall_seconds": watch.wall_seconds,
            "compile_seconds": watch.compile_seconds,
            "devices": describe(chain_mesh(self.devices, self.num_chains)),
            **result.timing,
            "warnings": [*result.warnings, *constrained],
        }
        return to_arviz(posterior, result.stats, attrs)
