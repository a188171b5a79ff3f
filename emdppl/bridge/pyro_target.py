r"""A Pyro model's posterior as an emdppl :class:`~emdppl.target.Target`, evaluated by torch.

This module holds :func:`target_from_pyro` and the pieces it is built from: the flat layout of
the latent sites (``_Layout``), Pyro's potential energy as a torch function (``_PyroPotential``)
and the choice of its fastest faithful evaluation, the way back to every model site
(:class:`PyroPostprocess`), and the initial positions.

The log density on the unconstrained space is Pyro's own potential energy
(``pyro.infer.mcmc.util.initialize_model``: log joint plus log-Jacobians of ``biject_to``),
negated, of the model in auxiliary form (:func:`emdppl.bridge.pyro_model.auxiliary_pyro`), and
reaches JAX through :func:`emdppl.bridge.callback.torch_logdensity`. Positions are dicts
``{site: array}`` of the auxiliary model's latent sites (``mu_decentered``, ...), like the
NumPyro target's; ``postprocess_fn`` returns every latent of the original and auxiliary models on
its constrained scale and the ``pyro.deterministic`` sites, as the NumPyro twin does.

Like :mod:`emdppl.bridge.pyro_model`, it imports torch and pyro inside the functions only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from emdppl.base import PRNGKey, as_key
from emdppl.bridge.aten import LoweredLogDensity, LoweringError, agrees_with_torch, lower_to_jax
from emdppl.bridge.callback import (
    TorchLogDensity,
    _as_numpy,
    agree,
    check_devices,
    host_callback,
    torch_logdensity,
)
from emdppl.bridge.pyro_model import (
    auxiliary_pyro,
    is_discrete,
    latent_sites,
    model_dtype,
    require_pyro,
    to_torch_args,
    trace_model,
)
from emdppl.target import Target, check_model_arguments, no_initial_position_error

__all__ = ["PyroPostprocess", "target_from_pyro"]

_INIT_RADIUS = 2.0
_INIT_TRIES = 100
EVALUATIONS = ("auto", "jax", "torch")


def torch_seed(rng_key: int | PRNGKey) -> int:
    """An integer seed for Pyro and torch, drawn from a JAX key (or seed)."""
    key = as_key(rng_key)
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _device(model: Any, model_args: tuple, model_kwargs: dict) -> Any:
    import torch

    tensors = {f"model_args[{i}]": a for i, a in enumerate(model_args)}
    tensors.update({f"model_kwargs[{k!r}]": v for k, v in model_kwargs.items()})
    if isinstance(model, torch.nn.Module):
        tensors.update({f"parameter {k!r}": p for k, p in model.named_parameters()})
    return check_devices(tensors)


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
    """Host side of :class:`PyroPostprocess`: the model conditioned on each position, all rows
    in one ``torch.func.vmap``-ed run (``batching="vmap"``) or one run per row (``"loop"``)."""

    def __init__(
        self, model, model_args, model_kwargs, transforms, layout, outputs, device, dtype
    ):
        self.model = model
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self.transforms = transforms
        self.layout = layout
        self.outputs = outputs
        self.device = device
        self.dtype = dtype
        self.batching = "loop"

    def one(self, flat: Any) -> tuple:
        """The output sites' values (in ``outputs``' order) at one flat position ``(d,)``."""
        import pyro
        from pyro import poutine

        unconstrained = self.layout.unflatten(flat)
        constrained = {k: self.transforms[k].inv(v) for k, v in unconstrained.items()}
        with pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(self.model, constrained)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        return tuple(trace.nodes[k]["value"] for k in self.outputs)

    def loop(self, flat: Any) -> tuple:
        """The output sites at every row of ``flat`` ``(n, d)``, one model run per row: a tuple
        of ``(n, *shape)``."""
        import torch

        with torch.no_grad():
            return tuple(torch.stack(column) for column in zip(*map(self.one, flat), strict=True))

    def vmapped(self, flat: Any) -> tuple:
        """As :meth:`loop`, in one ``torch.func.vmap``-ed model run."""
        import torch

        with torch.no_grad():
            return torch.func.vmap(self.one)(flat)

    def choose_batching(self, dim: int) -> str:
        """``"vmap"`` where the vmapped run agrees with the loop at the check points."""
        points = _check_points(dim, self.dtype)
        self.batching = "vmap" if _vmap_agrees(self.vmapped, points, self.loop(points)) else "loop"
        return self.batching

    def __call__(self, x: np.ndarray) -> dict:
        import torch

        batch_shape = x.shape[:-1]
        flat = torch.as_tensor(x.reshape(-1, x.shape[-1]), dtype=self.dtype, device=self.device)
        rows = self.vmapped if self.batching == "vmap" and flat.shape[0] > 1 else self.loop
        return {
            k: _as_numpy(column, x.dtype, batch_shape + shape)
            for (k, shape), column in zip(self.outputs.items(), rows(flat), strict=True)
        }


class PyroPostprocess(eqx.Module):
    """Unconstrained position ``{site: array}`` to every model site on its constrained scale:
    the auxiliary latents, the original latents (deterministic in auxiliary form, centered
    names) and the ``pyro.deterministic`` sites. Evaluated by torch through
    :func:`~emdppl.bridge.callback.host_callback` (no gradient)."""

    host: _HostPostprocess = eqx.field(static=True)

    def __call__(self, position: dict) -> dict:
        flat, _ = ravel_pytree(position)
        shapes = {k: jax.ShapeDtypeStruct(s, flat.dtype) for k, s in self.host.outputs.items()}
        return host_callback(self.host, shapes, flat, vmap_method="expand_dims")


def _check_points(dim: int, dtype: Any) -> Any:
    import torch

    return torch.linspace(-0.7, 0.9, 3 * dim, dtype=dtype).reshape(3, dim)


def _value_and_grad_loop(potential: Callable, points: Any) -> tuple[Any, Any]:
    import torch

    looped = points.clone().requires_grad_(True)
    values = torch.stack([potential(p) for p in looped])
    (grads,) = torch.autograd.grad(values.sum(), looped)
    return values.detach(), grads


def _vmap_agrees(vmapped: Callable, points: Any, reference: tuple) -> bool:
    """Whether ``vmapped(points)`` runs and agrees with ``reference`` (the loop's result); a
    model torch.func cannot transform (Python control flow on latent values) does not."""
    try:
        return agree(tuple(vmapped(points)), reference)
    except Exception:  # noqa: BLE001 - a model torch.func cannot transform runs in a loop
        return False


def _choose_potential(
    plain: _PyroPotential, traced: _PyroPotential, dim: int, dtype: Any
) -> tuple:
    """The fastest evaluation that agrees with Pyro's plain potential at three check points.

    The plain potential under ``torch.func.vmap`` if that runs and agrees (the bridge then
    traces its batched graph once per batch size, see :mod:`emdppl.bridge.callback`); else a
    loop over Pyro's ``torch.jit``-traced potential (``jit_compile=True``) if it agrees, else
    over the plain one (models whose Python control flow depends on latent values). Returns
    ``(potential, batching)``."""
    import torch

    points = _check_points(dim, dtype)
    reference = _value_and_grad_loop(plain, points)
    vmapped = torch.func.vmap(torch.func.grad_and_value(plain))
    if _vmap_agrees(lambda p: vmapped(p)[::-1], points, reference):  # (values, grads)
        return plain, "vmap"
    try:
        compiled = agree(_value_and_grad_loop(traced, points), reference)
    except Exception:  # noqa: BLE001 - a model torch.jit cannot trace runs uncompiled
        compiled = False
    return traced if compiled else plain, "loop"


def _lowered(
    potential: _PyroPotential, logdensity: TorchLogDensity, positions: np.ndarray, dtype: Any
) -> LoweredLogDensity:
    """Pyro's potential lowered to JAX (:mod:`emdppl.bridge.aten`), checked against torch's
    value and gradient at the three check points and at ``positions`` (the chains' starts);
    :class:`~emdppl.bridge.aten.LoweringError` when it does not lower or does not agree."""
    dim = positions.shape[1]
    points = _check_points(dim, dtype)
    fn = lower_to_jax(potential, points[0])
    points = np.concatenate([points.numpy(), positions.astype(points.numpy().dtype)])
    reference = logdensity.host.value_and_grad(points)
    if not agrees_with_torch(jax.jit(jax.vmap(jax.value_and_grad(fn))), points, reference):
        raise LoweringError(
            "the lowered potential does not agree with torch's at the check points (Python "
            "control flow on latent values is recorded for one branch only)"
        )
    return LoweredLogDensity(fn, logdensity.unravel_fn)


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
    raise no_initial_position_error(
        int(pending.sum()),
        num_chains,
        _INIT_TRIES,
        _INIT_RADIUS,
        "Check the data (NaN, out-of-support observations) and the sites' parameters.",
    )


def _checked_latents(model: Callable, model_args: tuple, model_kwargs: dict, seed: int) -> dict:
    """The latent sites of one run of the model as written, after rejecting discrete latents
    and models without latents."""
    latents = latent_sites(trace_model(model, model_args, model_kwargs, seed))
    discrete = [k for k, s in latents.items() if is_discrete(s["fn"])]
    if discrete:
        raise ValueError(
            f"discrete latent site(s) {discrete}: emdppl's samplers are gradient based. "
            "Marginalise them out in the model (e.g. a mixture with logsumexp over the "
            "components) or observe them; emdppl.bridge.check_auxiliary_pyro(model, ...) "
            "reports every site."
        )
    if not latents:
        raise ValueError("the model has no latent sample sites: there is nothing to infer.")
    return latents


def _potentials(
    model: Callable, model_args: tuple, model_kwargs: dict, seed: int
) -> tuple[list[_PyroPotential], _Layout, dict, Any]:
    """Pyro's potential of ``model``, plain and ``torch.jit``-traced, with the latents' layout,
    their ``biject_to`` transforms and the prototype trace of ``initialize_model``."""
    import pyro
    from pyro import poutine
    from pyro.infer.mcmc.util import initialize_model

    potentials = []
    for jit_compile in (False, True):
        with poutine.seed(rng_seed=seed), pyro.validation_enabled(False):
            params, potential_fn, transforms, prototype = initialize_model(
                model, model_args, model_kwargs, jit_compile=jit_compile, skip_jit_warnings=True
            )
        layout = _Layout({k: tuple(v.shape) for k, v in params.items()})
        potentials.append(_PyroPotential(potential_fn, layout))
    return potentials, layout, transforms, prototype


def _outputs(prototype: Any, latents: dict) -> dict[str, tuple[int, ...]]:
    """``{site: shape}`` of what ``postprocess_fn`` returns: the sampled model's latents, the
    original model's latents and the ``pyro.deterministic`` sites."""
    deterministic = [
        k
        for k, s in prototype.nodes.items()
        if s["type"] == "sample" and s.get("infer", {}).get("_deterministic")
    ]
    names = list(dict.fromkeys([*latent_sites(prototype), *latents, *deterministic]))
    return {k: tuple(prototype.nodes[k]["value"].shape) for k in names}


def target_from_pyro(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_chains: int = 4,
    rng_key: int | PRNGKey = 0,
    auxiliary: bool = True,
    evaluate: str = "auto",
) -> Target:
    r"""The :class:`~emdppl.Target` of a Pyro model's posterior, compiled to JAX or run by torch.

    ``logdensity_fn(position) = -U(position)``, Pyro's potential energy of the (auxiliary)
    model on the unconstrained space: :math:`\log p(\mathrm{data}, T(u)) + \log|\det J_T(u)|`,
    in the dtype of the model's tensors (:func:`.model_dtype`: float32 unless the data or
    parameters are float64), returned to JAX as float32. Two ways to evaluate it:

    - **compiled** (``evaluate="jax"``): the potential recorded once as aten ops and lowered
      to a JAX function (:mod:`emdppl.bridge.aten`), so the sampler's program holds the model
      like a NumPyro one (jitted, vmapped, differentiated by JAX; no host call per step). It is
      used only where it agrees with torch's value and gradient at three check points and at
      every chain's start. A float64 model computes in float32 unless JAX's x64 mode is on
      (as the NumPyro twin does with the same data), checked at float32's rounding.
    - **on the host** (``evaluate="torch"``): torch evaluates value and gradient, one host
      round trip per gradient (:func:`emdppl.bridge.torch_logdensity`); vmapped chains are one
      torch batch, in the model's dtype. Models with Python control flow on latent values or
      ops without a JAX translation run this way.

    ``"auto"`` (the default) compiles where it can and evaluates on the host otherwise;
    ``target.logdensity_fn`` is a :class:`~emdppl.bridge.aten.LoweredLogDensity` when compiled.

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
    evaluate
        ``"auto"``, ``"jax"`` (a :class:`~emdppl.bridge.aten.LoweringError` saying why when the
        model cannot be compiled) or ``"torch"`` (above).

    Returns
    -------
    Target
        ``initial_position``: ``{site: (num_chains, *shape)}`` float32 arrays;
        ``postprocess_fn``: see :class:`PyroPostprocess`.

    Examples
    --------
    >>> target = emdppl.bridge.target_from_pyro(model, model_args=(sigma, y))  # doctest: +SKIP
    >>> result = emdppl.MCMC("nuts").sample(0, target)  # doctest: +SKIP
    >>> draws = target.postprocess(result.positions)  # {"mu": (4, 1000), ...}  # doctest: +SKIP
    """
    require_pyro()
    if not callable(model):
        raise TypeError(f"model must be a Pyro model (a callable), got {type(model).__name__}.")
    if num_chains < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}.")
    if evaluate not in EVALUATIONS:
        raise ValueError(f"evaluate must be one of {EVALUATIONS}, got {evaluate!r}.")
    model_kwargs = dict(model_kwargs or {})
    check_model_arguments(model, tuple(model_args), model_kwargs)
    model_args, model_kwargs = to_torch_args(tuple(model_args), model_kwargs)
    device = _device(model, model_args, model_kwargs)
    dtype = model_dtype(model, model_args, model_kwargs)
    init_key, prototype_key = jax.random.split(as_key(rng_key))
    seed = torch_seed(prototype_key)

    latents = _checked_latents(model, model_args, model_kwargs, seed)
    sampled = auxiliary_pyro(model) if auxiliary else model
    potentials, layout, transforms, prototype = _potentials(sampled, model_args, model_kwargs, seed)
    example = {
        k: jnp.zeros(s, jnp.float32) for k, s in zip(layout.names, layout.shapes, strict=True)
    }
    dim = sum(layout.sizes)
    potential, batching = _choose_potential(*potentials, dim, dtype)
    logdensity = torch_logdensity(
        potential, example, device=device, dtype=dtype, batching=batching
    )
    outputs = _outputs(prototype, latents)
    host = _HostPostprocess(
        sampled, model_args, model_kwargs, transforms, layout, outputs, device, dtype
    )
    host.choose_batching(dim)
    postprocess = PyroPostprocess(host)
    flat = _initial_positions(logdensity, dim, num_chains, init_key)
    position = jax.vmap(logdensity.unravel_fn)(jnp.asarray(flat))
    if evaluate == "torch":
        return Target(logdensity, position, postprocess)
    try:
        if batching != "vmap":
            raise LoweringError(
                "torch.func.vmap does not reproduce the model's potential (Python control flow "
                "on latent values)"
            )
        lowered = _lowered(potential, logdensity, flat, dtype)
    except LoweringError as error:
        if evaluate == "jax":
            raise LoweringError(f"the Pyro model cannot be compiled to JAX: {error}.") from error
        return Target(logdensity, position, postprocess)
    return Target(lowered, position, postprocess)
