r"""What every sampler works on: a log density on an unconstrained space, and its way back.

A :class:`Target` is an equinox module (a pytree): the arrays it holds (data, initial positions)
are traced arguments of the jitted code, and the rest (the model function, flags) is static.
Two targets built from the same model on data of the same shapes therefore share compiled code:
a second :func:`emdppl.infer` call does not retrace the model. Arguments the model uses as
Python values are bound into the model instead (:class:`StaticArguments`, by
:func:`numpyro_inputs`), and discrete sites marked ``infer={"enumerate": "parallel"}`` are summed
out of the log density (``numpyro.contrib.funsor``).
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import biject_to
from numpyro.infer.initialization import init_to_median, init_to_uniform, init_to_value
from numpyro.infer.util import constrain_fn, find_valid_initial_params, potential_energy

from emdppl.base import PRNGKey, PyTree, as_key, caller_stacklevel
from emdppl.reparam import auxiliary as make_auxiliary

__all__ = ["NumPyroLogDensity", "NumPyroPostprocess", "StaticArguments", "Target"]

#: How :meth:`Target.from_numpyro` draws initial positions, besides a dict of values.
_DRAWN_INITS = ("uniform", "median")


def _call_model(model: Callable, is_auxiliary: bool) -> Callable:
    return make_auxiliary(model) if is_auxiliary else model


def is_enumerated(site: dict) -> bool:
    """Whether a sample site is a discrete latent marked ``infer={"enumerate": "parallel"}``
    (summed out of the log density, as NumPyro's NUTS does, by ``numpyro.contrib.funsor``)."""
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and site["fn"].has_enumerate_support
        and site.get("infer", {}).get("enumerate") == "parallel"
    )


def _enumerated_model(model: Callable, first_available_dim: int | None) -> Callable:
    """``model`` with its enumerated sites summed out on batch dims ``<= first_available_dim``
    (left of every plate); ``model`` itself when ``first_available_dim`` is ``None``."""
    if first_available_dim is None:
        return model
    from numpyro.contrib.funsor import enum  # here: importing funsor takes about 0.6 s

    return enum(model, first_available_dim)


class NumPyroLogDensity(eqx.Module):
    r"""The positive log joint of a NumPyro model on its unconstrained (auxiliary) space.

    ``self(position) = log p(data, T(position)) + log |det J_T(position)|``, where ``position``
    is a dict ``{site: array}`` of unconstrained latent values and ``T`` maps each site to its
    support. Discrete sites marked ``infer={"enumerate": "parallel"}`` are summed out,
    ``log p(data, T(position)) = log sum_z p(data, z, T(position))``, when
    ``first_available_dim`` (the batch dim left of every plate) is set. Calling it traces the
    model.
    """

    model: Callable = eqx.field(static=True)
    is_auxiliary: bool = eqx.field(static=True)
    model_args: tuple
    model_kwargs: dict
    first_available_dim: int | None = eqx.field(static=True, default=None)

    def __call__(self, position: dict) -> jax.Array:
        model = _call_model(self.model, self.is_auxiliary)
        model = _enumerated_model(model, self.first_available_dim)
        return -potential_energy(
            model,
            self.model_args,
            self.model_kwargs,
            position,
            enum=self.first_available_dim is not None,
        )


class NumPyroPostprocess(eqx.Module):
    """Map an unconstrained position to every model site on its constrained scale.

    Returns latent sites, the sites ``auxiliary()`` turned into deterministics (centered names,
    e.g. ``theta``) and the model's own ``numpyro.deterministic`` sites. Enumerated sites
    (``enumerated``) are not part of the position; as in NumPyro's MCMC, the model runs with
    them drawn from their prior at a fixed key, so a deterministic site that depends on them
    holds such a draw.
    """

    model: Callable = eqx.field(static=True)
    is_auxiliary: bool = eqx.field(static=True)
    model_args: tuple
    model_kwargs: dict
    enumerated: bool = eqx.field(static=True, default=False)

    def __call__(self, position: dict) -> dict:
        model = _call_model(self.model, self.is_auxiliary)
        if self.enumerated:
            model = handlers.seed(model, 0)
        return constrain_fn(
            model, self.model_args, self.model_kwargs, position, return_deterministic=True
        )


def _trace_at_init(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey
) -> dict:
    """A trace of the model with continuous latents at ``init_to_uniform`` values (so latents
    that cannot be sampled, e.g. ``dist.ImproperUniform`` flat priors, work); discrete latents
    are drawn from their prior, observed sites keep their data."""
    uniform = init_to_uniform(radius=2.0)

    def init_value(site: dict):
        if site["type"] != "sample" or site["is_observed"] or site["fn"].is_discrete:
            return None
        return uniform(site)

    seeded = handlers.substitute(handlers.seed(model, rng_key), substitute_fn=init_value)
    return handlers.trace(seeded).get_trace(*model_args, **model_kwargs)


def _prototype(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey, is_auxiliary: bool
) -> tuple[dict, dict]:
    """Unconstrained values of the latents at a prior draw, after rejecting discrete latents
    and models without latents, and warning about latents left centered; and, per observed
    site, the number of data values outside its likelihood's support (traced). Runs at trace
    time, once per compile."""
    trace = _trace_at_init(model, model_args, model_kwargs, rng_key)
    outside = {
        k: jnp.sum(~s["fn"].support(s["value"]))
        for k, s in trace.items()
        if s["type"] == "sample" and s["is_observed"]
    }
    latents = [
        k
        for k, s in trace.items()
        if s["type"] == "sample" and not s["is_observed"] and not is_enumerated(s)
    ]
    discrete = [k for k in latents if trace[k]["fn"].is_discrete]
    if discrete:
        families = {k: type(trace[k]["fn"]).__name__ for k in discrete}
        raise ValueError(
            f"discrete latent site(s) {discrete} ({families}): emdppl's samplers are gradient "
            "based. Mark those of finite support (Bernoulli, Categorical, ...) "
            "them infer={'enumerate': 'parallel'} (or decorate the model with "
            "numpyro.contrib.funsor.config_enumerate) to sum them out as NumPyro's NUTS does, "
            "marginalise them in the model (e.g. a mixture with logsumexp over the components) "
            "or observe them; emdppl.check_auxiliary(model, ...) reports every site."
        )
    if not latents:
        raise ValueError("the model has no latent sample sites: there is nothing to infer.")
    # flat priors (ImproperUniform) have no scale to take out: nothing to warn about
    centered = [
        k
        for k in latents
        if not k.endswith("_decentered")
        and not isinstance(trace[k]["fn"], numpyro.distributions.ImproperUniform)
    ]
    if is_auxiliary and centered:
        families = {k: type(trace[k]["fn"]).__name__ for k in centered}
        warnings.warn(
            f"site(s) left centered by auxiliary(): {families}; they are sampled on their "
            "unconstrained scale. emdppl.check_auxiliary(model, ...) says why and how to fix it.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    latent_values = {k: biject_to(trace[k]["fn"].support).inv(trace[k]["value"]) for k in latents}
    return latent_values, outside


def _init_strategy(init: str | dict, radius: float) -> Callable:
    """NumPyro's init strategy for ``init``: ``init_to_uniform(radius)``, ``init_to_median``
    (15 prior draws; uniform for sites without a sampler, e.g. flat priors) or
    ``init_to_value`` (the given sites; uniform for the others)."""
    if isinstance(init, dict):
        return init_to_value(values=init)
    if init == "median":
        return init_to_median(num_samples=15)
    return init_to_uniform(radius=radius)


@eqx.filter_jit
def _initial_positions(
    log_density: NumPyroLogDensity,
    rng_keys: PRNGKey,
    radius: float,
    init: str | dict = "uniform",
) -> tuple[dict, jax.Array, dict]:
    """One valid unconstrained position per key (by the ``init`` strategy: uniform in
    ``[-radius, radius]`` by default; retried until finite), their validity, and per observed
    site the count of data outside the support."""
    model = _call_model(log_density.model, log_density.is_auxiliary)
    enumerated = _enumerated_model(model, log_density.first_available_dim)
    prototype, outside = _prototype(
        model,
        log_density.model_args,
        log_density.model_kwargs,
        rng_keys[0],
        log_density.is_auxiliary,
    )

    def one(rng_key):
        (params, _, _), is_valid = find_valid_initial_params(
            rng_key,
            enumerated,
            init_strategy=_init_strategy(init, radius),
            enum=log_density.first_available_dim is not None,
            model_args=log_density.model_args,
            model_kwargs=log_density.model_kwargs,
            prototype_params=prototype,
        )
        return params, is_valid

    position, is_valid = jax.vmap(one)(rng_keys)
    return position, is_valid, outside


def _site_log_probs(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey
) -> dict:
    """Summed log probability of every sample site at a prior draw (to name a NaN/inf site)."""
    trace = _trace_at_init(model, model_args, model_kwargs, rng_key)
    return {
        k: float(jnp.sum(s["fn"].log_prob(s["value"])))
        for k, s in trace.items()
        if s["type"] == "sample"
    }


def _check_outside_support(outside: dict) -> None:
    """Refuse, naming the site, data outside the support of its likelihood (their log density
    would be silently finite or -inf); ``outside`` counts them per observed site."""
    outside = {k: int(v) for k, v in outside.items() if int(v)}
    if outside:
        raise ValueError(
            f"data NaN/inf or outside the likelihood's support at observed site(s) "
            f"{sorted(outside)}: {outside} values. Check the data or the likelihood."
        )


def _check_auxiliary_names(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey
) -> None:
    """Called when tracing the auxiliary form failed on an assertion: a site already named
    ``<latent>_decentered`` clashes with the noise the auxiliary form adds (NumPyro stops on a
    bare assertion); name it."""
    from emdppl.reparam import DECENTERED

    with numpyro.validation_enabled(False):
        names = set(_trace_at_init(model, model_args, model_kwargs, rng_key))
    clashes = sorted(k for k in names if k + DECENTERED in names)
    if clashes:
        raise ValueError(
            f"site(s) {[k + DECENTERED for k in clashes]} clash with the names the auxiliary form "
            f"gives the noise of {clashes}: rename them in the model, or pass auxiliary=False."
        )


def check_model_arguments(model: Callable, model_args: tuple, model_kwargs: dict) -> None:
    """Check the arguments against the model's signature before anything is traced."""
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):
        return
    name = getattr(model, "__name__", "the model")
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(model_kwargs) - set(params))
    if unknown and not takes_any:
        raise ValueError(
            f"unknown model_kwargs {unknown}: {name} takes {list(params)}. Pass "
            "model_kwargs=dict(...) with the model's own argument names."
        )
    try:
        signature.bind(*model_args, **model_kwargs)
    except TypeError as err:
        raise ValueError(
            f"model_args/model_kwargs do not fit {name}{signature}: {err}. Pass "
            "model_kwargs=dict(...) with the model's own argument names."
        ) from None


#: What JAX raises when a model uses a traced value as a Python value (``len(np.unique(x))``,
#: ``int(x.max())``, ``if x:``).
_CONCRETE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerBoolConversionError,
)


def _fingerprint(value: Any) -> Any:
    """A hashable stand-in for ``value``, equal for equal values: arrays by dtype, shape and a
    SHA-256 of their bytes; lists, tuples and dicts element by element."""
    if isinstance(value, (np.ndarray, jax.Array)):
        array = np.ascontiguousarray(value)
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        return ("array", array.dtype.str, array.shape, digest)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_fingerprint(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), _fingerprint(value[k])) for k in sorted(value, key=repr)))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


class StaticArguments:
    """A model with some arguments fixed as compile-time constants (NumPyro's
    ``jit_model_args=False``, for those arguments only).

    ``StaticArguments(model, static)(*args, **kwargs) = model(*args, **kwargs, **static)``.
    The values in ``static`` reach the model as they were given (a numpy array stays one, so
    ``len(np.unique(dept))`` works) and are closed over by the jitted code. Two instances are
    equal when they wrap the same model with equal values: an equal data set reuses the compiled
    code, other values compile anew. Its signature is the model's without the static arguments.

    Examples
    --------
    >>> bound = emdppl.target.StaticArguments(glmm, {"dept": dept})  # doctest: +SKIP
    >>> bound(male, applications, admit)  # glmm(male=male, ..., dept=dept)  # doctest: +SKIP
    """

    def __init__(self, model: Callable, static: dict[str, Any]) -> None:
        self.model = model
        self.static = dict(static)
        self._key = (model, _fingerprint(self.static))
        self.__name__ = getattr(model, "__name__", type(model).__name__)
        try:
            signature = inspect.signature(model)
        except (TypeError, ValueError):
            return
        kept = [p for name, p in signature.parameters.items() if name not in self.static]
        self.__signature__ = signature.replace(parameters=kept)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:  # by this signature, so that they land after the static ones are taken out
            args, kwargs = _split_arguments(self, args, kwargs)
        return self.model(*args, **kwargs, **self.static)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StaticArguments) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"StaticArguments({self.__name__}, static={sorted(self.static)})"


def _as_data(value: Any) -> Any:
    """A (nested) list of numbers as a numpy array, which the jitted code traces; anything else
    as it is."""
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return value
        if array.dtype.kind in "biuf":
            return array
    return value


def _is_data(value: Any) -> bool:
    """An array, or a list that :func:`_as_data` turns into one."""
    return isinstance(value, (np.ndarray, jax.Array)) or _as_data(value) is not value


def _split_arguments(model: Callable, model_args: tuple, model_kwargs: dict) -> tuple[list, dict]:
    """The arguments that must stay positional (positional-only ones, ``*args`` and those before
    them), and the others by name (``**kwargs`` entries included)."""
    signature = inspect.signature(model)
    bound = signature.bind(*model_args, **model_kwargs)
    params = signature.parameters
    kind = inspect.Parameter
    has_varargs = any(
        params[k].kind is kind.VAR_POSITIONAL and v for k, v in bound.arguments.items()
    )
    positional, named = [], {}
    for name, value in bound.arguments.items():
        param_kind = params[name].kind
        if param_kind is kind.VAR_POSITIONAL:
            positional.extend(value)
        elif param_kind is kind.VAR_KEYWORD:
            named.update(value)
        elif param_kind is kind.POSITIONAL_ONLY or (
            param_kind is kind.POSITIONAL_OR_KEYWORD and has_varargs
        ):
            positional.append(value)
        else:
            named[name] = value
    return positional, named


def _static_names(static: str | Sequence[str]) -> tuple[str, ...]:
    names = (static,) if isinstance(static, str) else tuple(static)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"static must name model arguments (strings), got {static!r}.")
    return names


def _bind_static(
    model: Callable, model_args: tuple, model_kwargs: dict, names: tuple[str, ...]
) -> tuple[StaticArguments, tuple, dict]:
    """``model`` with the arguments ``names`` bound as constants, and the other arguments."""
    label = getattr(model, "__name__", "the model")
    try:
        positional, named = _split_arguments(model, model_args, model_kwargs)
    except (TypeError, ValueError):
        raise ValueError(
            f"static={names}: {label} has no signature to find its arguments by name in."
        ) from None
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(
            f"static={names}: {missing} are not arguments that {label}{inspect.signature(model)} "
            f"is given by name (given: {list(named)}; an argument left at its default is a Python "
            "value already, one passed by position before *args cannot be bound)."
        )
    static = {n: named.pop(n) for n in names}
    return StaticArguments(model, static), tuple(positional), named


def check_static_names(
    model: Callable, model_args: tuple, model_kwargs: dict, static: str | Sequence[str]
) -> None:
    """Refuse ``static`` names that are not arguments ``model`` is given by name (the check of
    :func:`numpyro_inputs`, for a model that binds nothing, as a Pyro model run eagerly)."""
    names = _static_names(static)
    if names:
        _bind_static(model, model_args, dict(model_kwargs), names)


class _ModelInfo(NamedTuple):
    """What one trace of a model tells before anything is compiled (Python values only)."""

    #: ``None``, or what JAX raised when the model used a traced value as a Python value.
    concrete_error: str | None
    #: The batch dim left of every plate, where enumerated sites put their values; ``None``
    #: when no site is enumerated.
    first_available_dim: int | None


@eqx.filter_jit
def _model_info(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey
) -> _ModelInfo:
    """One abstract trace of ``model`` (cached: data of the same shapes do not trace again)."""
    try:
        with numpyro.validation_enabled(False):
            trace = _trace_at_init(model, model_args, model_kwargs, rng_key)
    except _CONCRETE_ERRORS as err:
        return _ModelInfo(f"{type(err).__name__}: {str(err).splitlines()[0]}", None)
    except Exception:  # any other error is raised, with its context, where the model runs
        return _ModelInfo(None, None)
    if not any(is_enumerated(s) for s in trace.values()):
        return _ModelInfo(None, None)
    plate_dims = [
        f.dim
        for s in trace.values()
        if s["type"] == "sample"
        for f in s["cond_indep_stack"]
        if f.dim is not None
    ]
    return _ModelInfo(None, min(plate_dims, default=0) - 1)


def numpyro_inputs(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    static: str | Sequence[str] = (),
) -> tuple[Callable, tuple, dict]:
    """The model and arguments the jitted code traces: the arguments named in ``static`` bound
    as constants (:class:`StaticArguments`), lists of numbers turned into arrays.

    When the model uses its traced data as Python values (``len(np.unique(dept))``) and
    ``static`` is empty, every array argument is made static, with a warning that names them and
    ``static=``; a model that still fails, or fails although ``static`` was given, is refused
    with the error JAX raised. A model that runs traced is returned as it is: data of the same
    shapes reuse the compiled code.
    """
    model_kwargs = dict(model_kwargs or {})
    names = _static_names(static)
    check_model_arguments(model, tuple(model_args), model_kwargs)
    if names:
        model, model_args, model_kwargs = _bind_static(model, model_args, model_kwargs, names)
    label = getattr(model, "__name__", "the model")
    model_args = tuple(_as_data(v) for v in model_args)
    model_kwargs = {k: _as_data(v) for k, v in model_kwargs.items()}
    error = _model_info(model, model_args, model_kwargs, jax.random.key(0)).concrete_error
    if error is None:
        return model, model_args, model_kwargs
    advice = (
        "Write those lines with jax.numpy on arrays (jnp.where instead of if, shapes instead "
        "of values), or pass the values the model needs as Python values in static=(...)."
    )
    if names:
        raise ValueError(
            f"{label} uses a traced value as a Python value ({error}) although static={names}. "
            + advice
        )
    try:
        named = _split_arguments(model, model_args, model_kwargs)[1]
        arrays = tuple(k for k, v in named.items() if _is_data(v))
    except (TypeError, ValueError):
        arrays = ()
    if arrays:
        bound = _bind_static(model, model_args, model_kwargs, arrays)
        if _model_info(*bound, jax.random.key(0)).concrete_error is None:
            warnings.warn(
                f"{label} uses its data as Python values ({error}), so its array arguments "
                f"{list(arrays)} are compile-time constants for this run (NumPyro's "
                "jit_model_args=False): new data compile anew. Say so with "
                f"static={arrays!r}, or name in static= only those the model needs as Python "
                "values, so that the others are traced.",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
            return bound
    tried = (
        f"even with its array arguments {list(arrays)} static"
        if arrays
        else ("and it has no array argument passed by name to make static")
    )
    raise ValueError(
        f"{label} uses a traced value as a Python value ({error}), {tried}: a latent site's "
        "value or a computed array is used as a Python value. " + advice
    )


def _check_init(
    model: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey, init: str | dict
) -> None:
    """Refuse an unknown strategy, and values for sites the (auxiliary) model does not sample
    (enumerated discrete sites are summed out, not sampled), naming the sites it does."""
    if isinstance(init, dict):
        trace = _trace_at_init(model, model_args, model_kwargs, rng_key)
        latents = [
            k
            for k, s in trace.items()
            if s["type"] == "sample" and not s["is_observed"] and not is_enumerated(s)
        ]
        unknown = sorted(set(init) - set(latents))
        if unknown:
            from emdppl.reparam import DECENTERED

            hint = [k + DECENTERED for k in unknown if k + DECENTERED in latents]
            raise ValueError(
                f"init values for {unknown}, which are not sampled sites; the sampled sites are "
                f"{latents}."
                + (
                    f" In auxiliary form {hint} are sampled instead (unit-scale noise): give "
                    "values for those, or run with auxiliary=False."
                    if hint
                    else ""
                )
            )
    elif init not in _DRAWN_INITS:
        raise ValueError(
            f"init must be one of {_DRAWN_INITS} or a dict of site values, got {init!r}."
        )


def no_initial_position_error(
    num_failed: int, num_chains: int, num_tries: int, radius: float, advice: str
) -> ValueError:
    """The error for chains that found no point where log density and gradient are finite
    (uniform draws in ``[-radius, radius]`` on the unconstrained scale); ``advice`` ends it."""
    return ValueError(
        f"the log density or its gradient is NaN/inf at every tried initial point of "
        f"{num_failed} of {num_chains} chains ({num_tries} tries each, uniform in "
        f"[-{radius}, {radius}] on the unconstrained scale). {advice}"
    )


class Target(eqx.Module):
    """A positive log density on an unconstrained space, where chains start, and the way back.

    Attributes
    ----------
    logdensity_fn
        ``logdensity_fn(position) -> scalar``: the positive log density (up to a constant) of
        one position, a pytree without chain axis.
    initial_position
        The starting positions, a pytree whose leaves have a leading ``(num_chains,)`` axis.
    postprocess_fn
        ``postprocess_fn(position) -> dict`` of named arrays (model sites on their constrained
        scale), or ``None`` when the position is reported as it is.
    """

    logdensity_fn: Callable
    initial_position: PyTree
    postprocess_fn: Callable | None = None

    @property
    def num_chains(self) -> int:
        """Length of the leading axis of ``initial_position``."""
        return jax.tree.leaves(self.initial_position)[0].shape[0]

    def postprocess(self, positions: PyTree) -> dict:
        """Named arrays for positions with two leading axes ``(chain, draw)``."""
        return _postprocess(self.postprocess_fn, positions)

    @classmethod
    def from_numpyro(
        cls,
        model: Callable,
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        num_chains: int = 4,
        rng_key: int | PRNGKey = 0,
        auxiliary: bool = True,
        init_radius: float = 2.0,
        init: str | dict = "uniform",
        static: str | Sequence[str] = (),
    ) -> Target:
        """Build the target of a NumPyro model's posterior.

        Parameters
        ----------
        model
            A NumPyro model, written as people write it (centered is fine).
        model_args, model_kwargs
            Its arguments; arrays (and lists of numbers, turned into arrays) among them are
            traced, Python scalars and the arguments named in ``static`` are compile-time
            constants.
        num_chains
            Number of initial positions, drawn by ``init`` and retried until log density and
            gradient are finite.
        rng_key
            Seed or key for the initial positions.
        auxiliary
            Apply :func:`emdppl.auxiliary` first (the default).
        init_radius
            Half-width of the uniform draws on the unconstrained scale.
        init
            NumPyro's initialisation strategies: ``"uniform"`` (``init_to_uniform(init_radius)``,
            the default), ``"median"`` (``init_to_median``: the median of 15 prior draws per
            chain; uniform for sites without a sampler, such as flat priors), or a dict
            ``{site: value}`` (``init_to_value``) of values on the constrained scale of sampled
            sites (in auxiliary form: ``theta_decentered``, not ``theta``), uniform for the
            sites it leaves out. An optimisation-based start is :class:`emdppl.MCMC`'s
            ``init="optimize"``.
        static
            Names of arguments the model uses as Python values (``len(np.unique(dept))``,
            ``int(np.max(y))``): they reach the model as given and are closed over, an equal
            data set reusing the compiled code. Left empty, a model that needs concrete data
            gets all its array arguments static, with a warning (:func:`numpyro_inputs`).

        Notes
        -----
        Discrete latent sites marked ``infer={"enumerate": "parallel"}`` are summed out of the
        log density (``numpyro.contrib.funsor``, as NumPyro's NUTS does); the position holds the
        continuous sites only.

        Examples
        --------
        >>> data = dict(sigma=s, y=y)
        >>> target = emdppl.Target.from_numpyro(eight_schools, model_kwargs=data)  # doctest: +SKIP
        >>> first = jax.tree.map(lambda x: x[0], target.initial_position)  # doctest: +SKIP
        >>> target.logdensity_fn(first)  # doctest: +SKIP
        """
        model_kwargs = dict(model_kwargs or {})
        if not callable(model):
            raise TypeError(
                f"model must be a NumPyro model (a callable), got {type(model).__name__}."
            )
        if num_chains < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}.")
        model, model_args, model_kwargs = numpyro_inputs(model, model_args, model_kwargs, static)
        _check_init(_call_model(model, auxiliary), model_args, model_kwargs, as_key(rng_key), init)
        dim = _model_info(model, model_args, model_kwargs, jax.random.key(0)).first_available_dim
        log_density = NumPyroLogDensity(model, auxiliary, model_args, model_kwargs, dim)
        postprocess = NumPyroPostprocess(
            model, auxiliary, model_args, model_kwargs, dim is not None
        )
        position = _draw_initial_positions(log_density, num_chains, rng_key, init_radius, init)
        return cls(log_density, position, postprocess)

    @classmethod
    def from_logdensity(
        cls,
        logdensity_fn: Callable,
        initial_position: PyTree,
        *,
        num_chains: int | None = None,
        postprocess_fn: Callable | None = None,
    ) -> Target:
        """Wrap a plain JAX log density.

        Parameters
        ----------
        logdensity_fn
            ``logdensity_fn(position) -> scalar``, positive log density up to a constant.
        initial_position
            One position per chain (leading chain axis), or one position to copy ``num_chains``
            times when ``num_chains`` is given.
        num_chains
            See ``initial_position``.
        postprocess_fn
            Optional map from a position to a dict of named arrays.

        Examples
        --------
        >>> logdensity = lambda x: -0.5 * x @ x
        >>> target = emdppl.Target.from_logdensity(logdensity, jnp.zeros(2), num_chains=4)
        """
        if num_chains is not None:
            if num_chains < 1:
                raise ValueError(f"num_chains must be >= 1, got {num_chains}.")
            initial_position = jax.tree.map(
                lambda x: jnp.broadcast_to(jnp.asarray(x), (num_chains, *jnp.shape(x))),
                initial_position,
            )
        initial_position = jax.tree.map(jnp.asarray, initial_position)
        if any(jnp.ndim(x) == 0 for x in jax.tree.leaves(initial_position)):
            raise ValueError(
                "initial_position needs a leading chain axis; pass num_chains=... to copy a single "
                "position to every chain."
            )
        first = jax.tree.map(lambda x: x[0], initial_position)
        value = logdensity_fn(first)
        if jnp.shape(value) != ():
            raise ValueError(
                f"logdensity_fn must return a scalar for one position, got shape "
                f"{jnp.shape(value)}."
            )
        if not bool(jnp.isfinite(value)):
            raise ValueError(
                f"logdensity_fn is {float(value)} at the first initial position; start the chains "
                "inside the support."
            )
        return cls(logdensity_fn, initial_position, postprocess_fn)

    def with_initial_position(self, initial_position: PyTree) -> Target:
        """The same target, started elsewhere."""
        return Target(self.logdensity_fn, initial_position, self.postprocess_fn)

    def with_init(
        self, init: str | dict, rng_key: int | PRNGKey, *, init_radius: float = 2.0
    ) -> Target:
        """The same target with its ``num_chains`` initial positions drawn anew by ``init``
        (as in :meth:`from_numpyro`); only a NumPyro model's target has the sites to draw."""
        log_density = self.logdensity_fn
        if not isinstance(log_density, NumPyroLogDensity):
            raise ValueError(
                f"init={init!r} draws a NumPyro model's sites; this Target is a plain log density "
                "(from_logdensity, or a Pyro model). Set its positions with "
                "target.with_initial_position(...), or use init='optimize' from them."
            )
        model = _call_model(log_density.model, log_density.is_auxiliary)
        _check_init(model, log_density.model_args, log_density.model_kwargs, as_key(rng_key), init)
        position = _draw_initial_positions(log_density, self.num_chains, rng_key, init_radius, init)
        return self.with_initial_position(position)


def _draw_initial_positions(
    log_density: NumPyroLogDensity,
    num_chains: int,
    rng_key: int | PRNGKey,
    radius: float,
    init: str | dict,
) -> dict:
    """``num_chains`` valid initial positions, or the error naming the sites at fault."""
    keys = jax.random.split(as_key(rng_key), num_chains)
    try:
        with numpyro.validation_enabled(False):
            position, is_valid, outside = _initial_positions(log_density, keys, radius, init)
    except AssertionError:
        if log_density.is_auxiliary:
            _check_auxiliary_names(
                log_density.model, log_density.model_args, log_density.model_kwargs, keys[0]
            )
        raise
    _check_outside_support(outside)
    if not bool(jnp.all(is_valid)):
        model = _call_model(log_density.model, log_density.is_auxiliary)
        site_lp = _site_log_probs(model, log_density.model_args, log_density.model_kwargs, keys[0])
        bad = [k for k, v in site_lp.items() if not jnp.isfinite(v)]
        advice = (
            f"Sites with a non-finite log probability at a prior draw: {bad or 'none found'}. "
            "Check the data (NaN, out-of-support observations) and the parameters of those sites."
        )
        if init != "uniform":
            advice = f"(init={init!r} did not give a finite start either.) " + advice
        raise no_initial_position_error(int(jnp.sum(~is_valid)), num_chains, 100, radius, advice)
    return position


@eqx.filter_jit
def _postprocess(postprocess_fn: Callable | None, positions: PyTree) -> dict:
    if postprocess_fn is None:
        return positions if isinstance(positions, dict) else {"x": positions}
    return jax.vmap(jax.vmap(postprocess_fn))(positions)
