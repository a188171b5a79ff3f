r"""Pyro models as emdppl targets: auxiliary form by Pyro's reparam handlers, torch through the
bridge.

:func:`target_from_pyro` puts a Pyro model in auxiliary (non-centered) form with
``poutine.reparam`` and the same families as :mod:`emdppl.reparam`:

- loc-scale families (Normal, StudentT, Cauchy, Laplace, Logistic, Gumbel, SoftLaplace):
  ``LocScaleReparam(centered=0)``, :math:`\theta = \mu + \tau\,\theta_{\rm decentered}`;
- ``MultivariateNormal``: :math:`x = \mu + L\,x_{\rm decentered}`;
- scale families (HalfNormal, HalfCauchy, Exponential, Gamma): unit-scale
  :math:`\tau_{\rm decentered}` times the scale (or over the rate);
- ``TransformedDistribution`` (``LogNormal``, ...): ``TransformReparam`` of its base.

Its log density on the unconstrained space is Pyro's own potential energy
(``pyro.infer.mcmc.util.initialize_model``: log joint plus log-Jacobians of ``biject_to``),
negated, and reaches JAX through :func:`emdppl.bridge.torch_logdensity`. Positions are dicts
``{site: array}`` of the auxiliary model's latent sites (``mu_decentered``, ...), like the
NumPyro target's; ``postprocess_fn`` returns every latent of the original and auxiliary models on
its constrained scale and the ``pyro.deterministic`` sites, as the NumPyro twin does.

torch and pyro are imported only when a Pyro model is used; without them an ``ImportError``
names the extra to install, ``pip install 'emdppl[pyro]'``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from emdppl.base import PRNGKey, as_key
from emdppl.bridge import INSTALL_HINT, TorchLogDensity, check_devices, torch_logdensity
from emdppl.reparam import site_report
from emdppl.target import Target, check_model_arguments

__all__ = ["check_auxiliary_pyro", "is_pyro_model", "pyro_svi_infer", "target_from_pyro"]

_DECENTERED = "_decentered"
_MAX_DEPTH = 3
_INIT_RADIUS = 2.0
_INIT_TRIES = 100
_EMPTY_CELL = object()


def _require_pyro() -> tuple[Any, Any]:
    try:
        import pyro
        import torch
    except ImportError as err:
        raise ImportError(
            f"using a Pyro model needs torch and pyro-ppl, which are not installed: {INSTALL_HINT}"
        ) from err
    return torch, pyro


# ------------------------------------------------------------------------------------------
# Recognising a Pyro model without importing pyro.


def _is_pyro_object(value: Any) -> bool:
    if isinstance(value, types.ModuleType):
        name = value.__name__
    else:
        name = getattr(value, "__module__", None) or type(value).__module__
    return name == "pyro" or name.startswith("pyro.")


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _layers(model: Any) -> Iterator[Any]:
    """``model`` and what it wraps: methods, partials, poutine handlers, ``forward``."""
    for _ in range(10):
        yield model
        if isinstance(model, types.FunctionType):
            return
        if isinstance(model, types.MethodType):
            model = model.__func__
        elif hasattr(model, "func") and callable(model.func):
            model = model.func
        elif hasattr(model, "fn") and callable(model.fn):
            model = model.fn
        elif hasattr(model, "forward"):
            model = model.forward
        else:
            return


def _uses_pyro(fn: types.FunctionType, depth: int, seen: set) -> bool:
    if id(fn) in seen or depth > _MAX_DEPTH:
        return False
    seen.add(id(fn))
    cells = [c.cell_contents for c in fn.__closure__ or () if _cell_is_set(c)]
    names = {n for code in _code_objects(fn.__code__) for n in code.co_names}
    values = [fn.__globals__[n] for n in names if n in fn.__globals__] + cells
    for value in values:
        if _is_pyro_object(value):
            return True
    return any(
        _uses_pyro(value, depth + 1, seen)
        for value in values
        if isinstance(value, types.FunctionType)
    )


def _cell_is_set(cell: Any) -> bool:
    try:
        return cell.cell_contents is not _EMPTY_CELL
    except ValueError:
        return False


def is_pyro_model(model: Any) -> bool:
    """Whether ``model`` is a Pyro model (as opposed to a NumPyro model or a plain function).

    The rule, static and cheap: ``pyro`` has been imported (``"pyro" in sys.modules``; a model
    defined in Pyro must have imported it), and the model is a ``pyro.nn.PyroModule`` or its
    function (unwrapping methods, ``functools.partial``, poutine handlers and ``forward``)
    refers, through a global name or a closure, to an object of the ``pyro`` package
    (``pyro``, ``pyro.sample``, ``pyro.distributions``, ...), directly or in a function it calls
    (up to 3 calls deep). ``numpyro`` objects do not count. Neither torch nor pyro is imported.

    Examples
    --------
    >>> emdppl.pyro.is_pyro_model(emdppl.models.eight_schools)
    False
    """
    if "pyro" not in sys.modules or not callable(model):
        return False
    seen: set = set()
    for layer in _layers(model):
        if _is_pyro_object(layer) or _is_pyro_object(type(layer)):
            return True
        if isinstance(layer, types.FunctionType) and _uses_pyro(layer, 0, seen):
            return True
    return False


# ------------------------------------------------------------------------------------------
# The auxiliary strategy, with Pyro's reparameterizers.


def _families() -> tuple[dict, dict]:
    import pyro.distributions as dist

    loc_scale = {
        dist.Normal: (),
        dist.Cauchy: (),
        dist.Laplace: (),
        dist.Logistic: (),
        dist.Gumbel: (),
        dist.SoftLaplace: (),
        dist.StudentT: ("df",),
    }
    # family -> (scale-like parameter, whether the value is scale * raw or raw / rate)
    scale = {
        dist.HalfNormal: ("scale", True),
        dist.HalfCauchy: ("scale", True),
        dist.Exponential: ("rate", False),
        dist.Gamma: ("rate", False),
    }
    return loc_scale, scale


def _unwrap(fn: Any) -> Any:
    import pyro.distributions as dist

    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _reparam_classes() -> tuple[type, type]:
    """Pyro ``Reparam`` subclasses for MVN and scale families (built when pyro is present)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.reparam.reparam import Reparam

    def deterministic(value, event_dim):
        return {
            "fn": dist.Delta(value, event_dim=event_dim).mask(False),
            "value": value,
            "is_observed": True,
        }

    class MultivariateNormalReparam(Reparam):
        r"""Non-center a ``MultivariateNormal``: :math:`x = \mu + L z`, :math:`z \sim N(0, I)`."""

        def apply(self, msg):
            fn = msg["fn"]
            base = _unwrap(fn)
            raw = pyro.sample(
                msg["name"] + _DECENTERED,
                dist.Normal(torch.zeros_like(fn.mean), 1.0).to_event(fn.event_dim),
            )
            value = base.loc + (base.scale_tril @ raw.unsqueeze(-1)).squeeze(-1)
            return deterministic(value, fn.event_dim)

    class ScaleReparam(Reparam):
        r"""Non-center a scale family: :math:`\tau = s\,\tau_{\rm raw}` or
        :math:`\tau_{\rm raw}/r`."""

        def apply(self, msg):
            fn, event_dim = self._unwrap(msg["fn"])
            param, multiply = _families()[1][type(fn)]
            scale = getattr(fn, param)
            unit = {param: torch.ones_like(scale)}
            if isinstance(fn, dist.Gamma):
                unit["concentration"] = fn.concentration
            raw = pyro.sample(msg["name"] + _DECENTERED, self._wrap(type(fn)(**unit), event_dim))
            return deterministic(raw * scale if multiply else raw / scale, event_dim)

    return MultivariateNormalReparam, ScaleReparam


def _choose(msg: dict) -> tuple[Any, str]:
    """The Pyro reparameterizer for a sample site and a one-line reason for the choice."""
    import pyro.distributions as dist
    import torch.distributions as torch_dist
    from pyro.infer.reparam import LocScaleReparam, TransformReparam

    loc_scale, scale = _families()
    fn = _unwrap(msg["fn"])
    family = type(fn).__name__
    name = msg["name"]
    if name.endswith(_DECENTERED):
        return None, "created by auxiliary(): already unit-scale noise"
    if isinstance(fn, dist.MaskedDistribution):
        return None, f"{family} (masked) is left centered; apply the mask inside the model instead"
    if type(fn) in loc_scale:
        return (
            LocScaleReparam(centered=0.0, shape_params=loc_scale[type(fn)]),
            f"{family}: loc + scale * {name}{_DECENTERED}",
        )
    mvn_reparam, scale_reparam = _reparam_classes()
    if isinstance(fn, torch_dist.MultivariateNormal):
        return mvn_reparam(), f"{family}: loc + scale_tril @ {name}{_DECENTERED}"
    if type(fn) in scale:
        return scale_reparam(), f"{family}: unit-scale {name}{_DECENTERED} times its scale"
    if isinstance(fn, torch_dist.TransformedDistribution):
        return TransformReparam(), f"{family}: transform of {name}_base"
    return None, (
        f"{family} has no non-centered form here; it is sampled on its unconstrained scale "
        "(rewrite it as a deterministic map of unit-scale noise to make it auxiliary)"
    )


def _is_discrete(fn: Any) -> bool:
    return bool(fn.support.is_discrete or fn.has_enumerate_support)


def _strategy(msg: dict) -> Any:
    if msg["type"] != "sample" or msg["is_observed"] or _is_discrete(msg["fn"]):
        return None
    return _choose(msg)[0]


def _auxiliary(model: Callable) -> Callable:
    from pyro import poutine

    return poutine.reparam(model, config=_strategy)


# ------------------------------------------------------------------------------------------
# Arguments, traces, checks.


def _to_torch_args(model_args: tuple, model_kwargs: dict) -> tuple[tuple, dict]:
    """numpy and JAX arrays among the arguments become torch tensors (same dtype)."""
    import torch

    def convert(value):
        if isinstance(value, (np.ndarray, jax.Array)):
            return torch.as_tensor(np.asarray(value))
        return value

    return tuple(convert(a) for a in model_args), {k: convert(v) for k, v in model_kwargs.items()}


def _device(model: Any, model_args: tuple, model_kwargs: dict) -> Any:
    import torch

    tensors = {f"model_args[{i}]": a for i, a in enumerate(model_args)}
    tensors.update({f"model_kwargs[{k!r}]": v for k, v in model_kwargs.items()})
    if isinstance(model, torch.nn.Module):
        tensors.update({f"parameter {k!r}": p for k, p in model.named_parameters()})
    return check_devices(tensors)


def _trace(model: Callable, model_args: tuple, model_kwargs: dict, seed: int) -> Any:
    import pyro
    from pyro import poutine

    with poutine.seed(rng_seed=seed), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(*model_args, **model_kwargs)


def _latents(trace: Any) -> dict:
    """Latent sample sites of a Pyro trace (plates' subsample sites excluded)."""
    from pyro.poutine.subsample_messenger import _Subsample

    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
    }


def _seed(rng_key: int | PRNGKey) -> int:
    key = as_key(rng_key)
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def check_auxiliary_pyro(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    strict: bool = False,
) -> dict[str, dict[str, str]]:
    """Report what :func:`target_from_pyro` does to each latent site of a Pyro ``model``.

    The same report as :func:`emdppl.check_auxiliary`.

    Parameters
    ----------
    model, model_args, model_kwargs
        The Pyro model and its arguments (numpy arrays become torch tensors).
    strict
        Raise a ``ValueError`` naming every site that is not auxiliary (left centered or
        discrete) and how to fix it.

    Returns
    -------
    dict
        ``{site: {"status": "auxiliary" | "centered" | "discrete", "distribution": name,
        "detail": reason}}`` for every latent sample site of the original model.

    Examples
    --------
    >>> emdppl.pyro.check_auxiliary_pyro(model, model_args=(sigma, y))  # doctest: +SKIP
    {'mu': {'status': 'auxiliary', 'distribution': 'Normal', 'detail': ...}, ...}
    """
    _require_pyro()
    model_args, model_kwargs = _to_torch_args(tuple(model_args), dict(model_kwargs or {}))
    trace = _trace(model, model_args, model_kwargs, 0)
    return site_report(_latents(trace), _unwrap, _is_discrete, _choose, strict=strict)


# ------------------------------------------------------------------------------------------
# The target.


class _Layout:
    """Flat torch vector <-> ``{site: tensor}`` in ``ravel_pytree``'s order (sorted names)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.names = sorted(shapes)
        self.shapes = [shapes[k] for k in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def unflatten(self, flat: Any) -> dict:
        parts = flat.split(self.sizes)
        return {k: p.reshape(s) for k, p, s in zip(self.names, parts, self.shapes, strict=True)}


class _PyroPotential:
    """``fn(flat) = -potential_energy(unflatten(flat))``, Pyro validation off (a sampler's wild
    proposals give ``-inf``/NaN, which blackjax treats as divergent, rather than an error)."""

    def __init__(self, potential_fn: Callable, layout: _Layout):
        self.potential_fn = potential_fn
        self.layout = layout

    def __call__(self, flat: Any) -> Any:
        import pyro

        with pyro.validation_enabled(False):
            return -self.potential_fn(self.layout.unflatten(flat))


class _HostPostprocess:
    """Host side of :class:`PyroPostprocess`: one conditioned run of the model per position."""

    def __init__(self, model, model_args, model_kwargs, transforms, layout, outputs, device):
        self.model = model
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self.transforms = transforms
        self.layout = layout
        self.outputs = outputs
        self.device = device

    def one(self, flat: Any) -> dict:
        import pyro
        from pyro import poutine

        unconstrained = self.layout.unflatten(flat)
        constrained = {k: self.transforms[k].inv(v) for k, v in unconstrained.items()}
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(self.model, constrained)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        return {k: trace.nodes[k]["value"] for k in self.outputs}

    def __call__(self, x: np.ndarray) -> dict:
        import torch

        batch_shape = x.shape[:-1]
        flat = torch.as_tensor(x.reshape(-1, x.shape[-1]), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            rows = [self.one(row) for row in flat]
        return {
            k: np.stack([r[k].detach().cpu().numpy() for r in rows])
            .astype(x.dtype)
            .reshape(batch_shape + shape)
            for k, shape in self.outputs.items()
        }


class PyroPostprocess(eqx.Module):
    """Unconstrained position ``{site: array}`` to every model site on its constrained scale:
    the auxiliary latents, the original latents (deterministic in auxiliary form, centered
    names) and the ``pyro.deterministic`` sites. Evaluated by torch through ``pure_callback``
    (no gradient)."""

    host: _HostPostprocess = eqx.field(static=True)

    def __call__(self, position: dict) -> dict:
        flat, _ = ravel_pytree(position)
        shapes = {k: jax.ShapeDtypeStruct(s, flat.dtype) for k, s in self.host.outputs.items()}
        return jax.pure_callback(self.host, shapes, flat, vmap_method="expand_dims")


def _check_points(dim: int) -> Any:
    import torch

    return torch.linspace(-0.7, 0.9, 3 * dim, dtype=torch.float64).reshape(3, dim)


def _value_and_grad_loop(potential: Callable, points: Any) -> tuple[Any, Any]:
    import torch

    looped = points.clone().requires_grad_(True)
    values = torch.stack([potential(p) for p in looped])
    (grads,) = torch.autograd.grad(values.sum(), looped)
    return values.detach(), grads


def _agree(a: tuple, b: tuple) -> bool:
    import torch

    pairs = zip(a, b, strict=True)
    return all(torch.allclose(x, y, rtol=1e-7, atol=1e-9, equal_nan=True) for x, y in pairs)


def _choose_potential(plain: _PyroPotential, traced: _PyroPotential, dim: int) -> tuple:
    """The fastest evaluation that agrees with Pyro's plain potential at three check points:
    Pyro's ``torch.jit``-traced potential (``jit_compile=True``) if it agrees (it does not for
    models whose Python control flow depends on latent values), and ``torch.func.vmap``
    batching if it runs and agrees, else a loop. Returns ``(potential, batching)``."""
    import torch

    points = _check_points(dim)
    reference = _value_and_grad_loop(plain, points)
    try:
        potential = traced if _agree(_value_and_grad_loop(traced, points), reference) else plain
    except Exception:  # noqa: BLE001 - a model torch.jit cannot trace runs uncompiled
        potential = plain
    try:
        grads, values = torch.func.vmap(torch.func.grad_and_value(potential))(points)
    except Exception:  # noqa: BLE001 - a model torch.func cannot transform runs in a loop
        return potential, "loop"
    return potential, "vmap" if _agree((values, grads), reference) else "loop"


def _initial_positions(
    logdensity: TorchLogDensity, dim: int, num_chains: int, rng_key: PRNGKey
) -> np.ndarray:
    """Uniform in ``[-2, 2]`` on the unconstrained scale, retried while value or gradient is
    not finite; shape ``(num_chains, dim)``."""
    host = logdensity.host
    positions = np.zeros((num_chains, dim), np.float32)
    pending = np.ones(num_chains, bool)
    for key in jax.random.split(rng_key, _INIT_TRIES):
        draws = np.asarray(
            jax.random.uniform(key, (num_chains, dim), minval=-_INIT_RADIUS, maxval=_INIT_RADIUS)
        )
        values, grads = host.value_and_grad(draws)
        good = pending & np.isfinite(values) & np.all(np.isfinite(grads), axis=-1)
        positions[good] = draws[good]
        pending &= ~good
        if not pending.any():
            return positions
    raise ValueError(
        f"the log density or its gradient is NaN/inf at every tried initial point of "
        f"{int(pending.sum())} of {num_chains} chains ({_INIT_TRIES} tries each, uniform in "
        f"[-{_INIT_RADIUS}, {_INIT_RADIUS}] on the unconstrained scale). Check the data (NaN, "
        "out-of-support observations) and the sites' parameters."
    )


def target_from_pyro(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_chains: int = 4,
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
) -> Target:
    r"""Build the :class:`~emdppl.Target` of a Pyro model's posterior, evaluated by torch.

    ``logdensity_fn(position) = -U(position)``, Pyro's potential energy of the (auxiliary)
    model on the unconstrained space: :math:`\log p(\mathrm{data}, T(u)) + \log|\det J_T(u)|`,
    computed in float64 by torch and returned to JAX as float32 with its gradient in one host
    round trip (:func:`emdppl.bridge.torch_logdensity`); vmapped chains are one torch batch.

    Parameters
    ----------
    model
        A Pyro model (a function with ``pyro.sample`` statements, or a ``PyroModule``).
    model_args, model_kwargs
        Its arguments. numpy/JAX arrays become torch tensors of the same dtype; torch tensors
        are used as they are. All tensors (and a module's parameters) must be on one device,
        where torch evaluates the model.
    num_chains
        Number of initial positions, uniform in ``[-2, 2]`` on the unconstrained scale,
        retried until log density and gradient are finite.
    rng_key
        Seed or key for the initial positions and the model's prototype run.
    auxiliary
        Non-center the model first (module docstring); ``False`` samples it as written.

    Returns
    -------
    Target
        ``initial_position``: ``{site: (num_chains, *shape)}`` float32 arrays;
        ``postprocess_fn``: see :class:`PyroPostprocess`.

    Examples
    --------
    >>> target = emdppl.pyro.target_from_pyro(model, model_args=(sigma, y))  # doctest: +SKIP
    >>> result = emdppl.MCMC("nuts").sample(0, target)  # doctest: +SKIP
    >>> draws = target.postprocess(result.positions)  # {"mu": (4, 1000), ...}  # doctest: +SKIP
    """
    _require_pyro()
    import pyro
    from pyro import poutine
    from pyro.infer.mcmc.util import initialize_model

    if not callable(model):
        raise TypeError(f"model must be a Pyro model (a callable), got {type(model).__name__}.")
    if num_chains < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}.")
    model_kwargs = dict(model_kwargs or {})
    check_model_arguments(model, tuple(model_args), model_kwargs)
    model_args, model_kwargs = _to_torch_args(tuple(model_args), model_kwargs)
    device = _device(model, model_args, model_kwargs)
    init_key, prototype_key = jax.random.split(as_key(rng_key))
    seed = _seed(prototype_key)

    centered = _trace(model, model_args, model_kwargs, seed)
    latents = _latents(centered)
    discrete = [k for k, s in latents.items() if _is_discrete(s["fn"])]
    if discrete:
        raise ValueError(
            f"discrete latent site(s) {discrete}: emdppl's samplers are gradient based. "
            "Marginalise them out in the model (e.g. a mixture with logsumexp over the "
            "components) or observe them; emdppl.pyro.check_auxiliary_pyro(model, ...) reports "
            "every site."
        )
    if not latents:
        raise ValueError("the model has no latent sample sites: there is nothing to infer.")

    sampled = _auxiliary(model) if auxiliary else model
    potentials = []
    for jit_compile in (False, True):
        with poutine.seed(rng_seed=seed), pyro.validation_enabled(False):
            params, potential_fn, transforms, prototype = initialize_model(
                sampled, model_args, model_kwargs, jit_compile=jit_compile, skip_jit_warnings=True
            )
        layout = _Layout({k: tuple(v.shape) for k, v in params.items()})
        potentials.append(_PyroPotential(potential_fn, layout))
    example = {
        k: jnp.zeros(s, jnp.float32) for k, s in zip(layout.names, layout.shapes, strict=True)
    }
    dim = sum(layout.sizes)
    potential, batching = _choose_potential(*potentials, dim)
    logdensity = torch_logdensity(potential, example, device=device, batching=batching)

    deterministic = [
        k
        for k, s in prototype.nodes.items()
        if s["type"] == "sample" and s.get("infer", {}).get("_deterministic")
    ]
    names = list(dict.fromkeys([*_latents(prototype), *latents, *deterministic]))
    outputs = {k: tuple(prototype.nodes[k]["value"].shape) for k in names}
    postprocess = PyroPostprocess(
        _HostPostprocess(sampled, model_args, model_kwargs, transforms, layout, outputs, device)
    )

    flat = _initial_positions(logdensity, dim, num_chains, init_key)
    position = jax.vmap(logdensity.unravel_fn)(jnp.asarray(flat))
    return Target(logdensity, position, postprocess)


# ------------------------------------------------------------------------------------------
# SVI on a Pyro model: Pyro's own SVI (torch optimiser), the same InferenceData as emdppl.SVI.

_PYRO_GUIDES = {
    "auto_normal": "AutoNormal",
    "auto_multivariate_normal": "AutoMultivariateNormal",
    "auto_lowrank_multivariate_normal": "AutoLowRankMultivariateNormal",
    "auto_delta": "AutoDelta",
}


def pyro_svi_infer(
    model: Callable,
    config: Any,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
    progress_bar: bool = True,
) -> Any:
    """Fit a Pyro autoguide with Pyro's own SVI and return InferenceData like :class:`emdppl.SVI`.

    ``config`` is an :class:`emdppl.SVI` whose ``guide`` is an auto-guide name; the optimiser is
    ``pyro.optim.ClippedAdam`` (learning rate 0.01 decayed by 100x over ``num_steps``) and the
    loss ``Trace_ELBO(num_particles)``. ``num_samples`` guide draws are pushed through the
    auxiliary model by the same host code as :func:`target_from_pyro`'s ``postprocess_fn``, so
    ``posterior`` has the MCMC layout (one chain); the loss per step is the ``svi_trace`` group.
    """
    import time

    from tqdm.auto import tqdm

    from emdppl.inference_data import to_arviz

    torch, pyro = _require_pyro()
    from pyro import infer as pyro_infer
    from pyro.infer import autoguide

    if not isinstance(config.guide, str) or config.guide not in _PYRO_GUIDES:
        raise ValueError(
            f"a Pyro model takes a guide name from {sorted(_PYRO_GUIDES)}, got {config.guide!r}."
        )
    target = target_from_pyro(
        model,
        model_args=model_args,
        model_kwargs=model_kwargs,
        num_chains=1,
        rng_key=rng_key,
        auxiliary=auxiliary,
    )
    host = target.postprocess_fn.host
    seed = _seed(rng_key)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = getattr(autoguide, _PYRO_GUIDES[config.guide])(host.model)
    decay = 0.01 ** (1.0 / max(config.num_steps, 1))
    svi = pyro_infer.SVI(
        host.model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.01, "lrd": decay}),
        pyro_infer.Trace_ELBO(num_particles=config.num_particles),
    )
    start = time.perf_counter()
    losses = np.empty(config.num_steps)
    with pyro.validation_enabled(False):
        for step in tqdm(range(config.num_steps), desc="pyro svi", disable=not progress_bar):
            losses[step] = svi.step(*host.model_args, **host.model_kwargs)
            if not np.isfinite(losses[step]):
                raise FloatingPointError(
                    f"Pyro SVI loss is {losses[step]} at step {step}; lower the learning rate or "
                    "check the model's data. Parameters are in pyro.get_param_store()."
                )
        fit_seconds = time.perf_counter() - start
        draws = pyro_infer.Predictive(guide, num_samples=config.num_samples)(
            *host.model_args, **host.model_kwargs
        )
        with torch.no_grad():
            unconstrained = {
                k: host.transforms[k](draws[k].to(torch.float64)) for k in host.layout.names
            }
        flat = torch.cat(
            [unconstrained[k].reshape(config.num_samples, -1) for k in host.layout.names], dim=-1
        )
        posterior = host(flat.cpu().numpy().astype(np.float32)[None])
    attrs = {
        "algorithm": "svi",
        "backend": "pyro",
        "guide": config.guide,
        "num_steps": config.num_steps,
        "num_particles": config.num_particles,
        "auxiliary": int(auxiliary),
        "final_loss": float(np.mean(losses[-max(1, config.num_steps // 100) :])),
        "fit_seconds": fit_seconds,
        "wall_seconds": time.perf_counter() - start,
    }
    return to_arviz(posterior, attrs=attrs, svi_trace={"loss": losses[None]})
