r"""The torch-to-JAX callback bridge: a torch log density evaluated from jitted, vmapped JAX code.

This module holds :func:`torch_logdensity` (and its :class:`TorchLogDensity`), the host side
that runs torch, and the helpers the other bridge modules share: :func:`host_callback`,
:func:`require_torch`, :func:`check_devices` and :func:`agree`.

One mechanism carries everything: a host callback (:func:`host_callback`) inside
:func:`jax.custom_vjp`.

- A **log density** :math:`\log p(x)`, :math:`x \in \mathbb{R}^d`, becomes a JAX function whose
  forward pass of a gradient (``jax.value_and_grad``, what every gradient-based sampler calls)
  is *one* host round trip returning :math:`(\log p(x), \nabla \log p(x))` from torch autograd;
  the backward pass is the product of the cotangent with that stored gradient. Plain calls
  (no gradient) compute the value only.
- ``vmap_method="expand_dims"``: under ``jax.vmap`` (chains, a batch of E-step particles) the
  callback receives the whole batch, shape ``(..., d)``, once per step, and torch evaluates it
  with ``torch.func.vmap`` (``batching="vmap"``) or a Python loop with a single backward pass
  (``batching="loop"``, for functions ``torch.func`` cannot transform).
- :func:`host_callback` calls the host on CPU through ``jax.experimental.buffer_callback``
  (XLA's buffers read as numpy views, results written into the output buffers in place) and
  elsewhere through :func:`jax.pure_callback` (which copies every argument to a host
  ``jax.Array`` first, the larger part of a call's fixed cost on CPU), chosen for the platform
  the program is lowered for (:func:`jax.lax.platform_dependent`).
- Torch computes in ``dtype`` (float64 by default, so float32 JAX inputs lose nothing) on
  ``device``; results come back in the JAX input's dtype.

Higher derivatives (Hessians) are not available through the callback. A Pyro model's potential
is usually not evaluated here at all but compiled to JAX (:mod:`emdppl.bridge.aten`, which
records the aten ops ``torch.distributions`` dispatch to); this module serves what does not
compile, torch teachers, and the host evaluations (initial positions, postprocessing).

torch is imported lazily: importing this module works without it, and calling these functions
without torch raises an ``ImportError`` naming the extra, ``pip install 'emdppl[pyro]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback
from jax.flatten_util import ravel_pytree

from emdppl.base import PyTree

__all__ = [
    "INSTALL_HINT",
    "agree",
    "TorchLogDensity",
    "check_devices",
    "host_callback",
    "require_torch",
    "torch_logdensity",
]

INSTALL_HINT = "pip install 'emdppl[pyro]'"
BATCHINGS = ("vmap", "loop")
_MAX_TRACED_SIZES = 8


def require_torch(what: str) -> Any:
    """Import and return ``torch``, or raise an ``ImportError`` naming the extra to install."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{what} needs PyTorch, which is not installed: {INSTALL_HINT}") from err
    return torch


def check_devices(tensors: Mapping[str, Any]) -> Any:
    """The one torch device of ``tensors`` (``{name: tensor}``); ``cpu`` when there are none.

    Raises a ``ValueError`` listing every tensor's device when they are on more than one.
    """
    torch = require_torch("check_devices")
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    distinct = set(devices.values())
    if len(distinct) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(
            f"torch tensors on {len(distinct)} different devices ({where}); the bridge runs "
            "torch on one device: move the data and the module there first, e.g. "
            "tensor.to('cuda') / module.to('cuda')."
        )
    return distinct.pop() if distinct else torch.device("cpu")


def host_callback(
    host_fn: Callable, result_shape_dtypes: PyTree, *args: jax.Array, vmap_method: str
) -> PyTree:
    """``host_fn(*args)``, numpy arrays in and out, called from traced JAX code.

    On a CPU the call is a ``buffer_callback``: ``host_fn`` reads XLA's input buffers as numpy
    views and its results are copied into the output buffers. On other platforms it is a
    :func:`jax.pure_callback`. Both batch under ``jax.vmap`` by ``vmap_method`` (see
    :func:`jax.pure_callback`).

    Parameters
    ----------
    host_fn
        Pure host function; its results must match ``result_shape_dtypes`` in structure, shape
        and dtype (as for :func:`jax.pure_callback`).
    result_shape_dtypes
        Pytree of ``jax.ShapeDtypeStruct``.
    *args
        Arrays passed to ``host_fn`` as numpy arrays (valid during the call only).
    vmap_method
        ``"expand_dims"``, ``"broadcast_all"``, ... as for :func:`jax.pure_callback`.
    """

    def write(ctx, out, *buffers):
        del ctx
        results = host_fn(*(np.asarray(b) for b in buffers))
        for buffer, value in zip(jax.tree.leaves(out), jax.tree.leaves(results), strict=True):
            np.asarray(buffer)[...] = value

    def on_cpu(*xs):
        return buffer_callback(write, result_shape_dtypes, vmap_method=vmap_method)(*xs)

    def elsewhere(*xs):
        return jax.pure_callback(host_fn, result_shape_dtypes, *xs, vmap_method=vmap_method)

    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=elsewhere)


def agree(a: tuple, b: tuple) -> bool:
    """Whether two tuples of torch tensors agree to a float sum's rounding (rtol 1e-7 in
    float64, 1e-5 otherwise; NaN equal to NaN)."""
    import torch

    rtol = 1e-7 if a[0].dtype == torch.float64 else 1e-5
    pairs = zip(a, b, strict=True)
    return all(torch.allclose(x, y, rtol=rtol, atol=rtol / 100, equal_nan=True) for x, y in pairs)


def _trace_batched(vmapped: Callable, batch: Any) -> Callable | None:
    """``vmapped`` (a ``torch.func.vmap``-ed ``grad_and_value``) as a TorchScript graph for
    batches of ``batch``'s shape, or ``None`` where it cannot be traced or does not agree."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        graph = make_fx(vmapped)(batch)
        graph.graph.eliminate_dead_code()
        graph.recompile()
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(graph, batch, check_trace=False).eval())
            return traced if agree(tuple(traced(batch)), tuple(vmapped(batch))) else None
    except Exception:  # noqa: BLE001 - what cannot be traced runs through torch.func.vmap
        return None


def _as_numpy(tensor: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A torch tensor as a numpy array of ``dtype`` and ``shape``; a float64 value beyond
    float32's range becomes an infinity (a divergence to the sampler) without a warning."""
    with np.errstate(over="ignore"):
        return tensor.detach().cpu().numpy().astype(dtype).reshape(shape)


class _HostLogDensity:
    """Host side of :func:`torch_logdensity`: numpy in, torch in between, numpy out."""

    def __init__(self, fn: Callable, dim: int, device: Any, dtype: Any, batching: str):
        self.fn = fn
        self.dim = dim
        self.device = device
        self.dtype = dtype
        self.batching = batching
        self.traced: dict[int, Callable | None] = {}

    def _vmapped(self, batch: Any) -> tuple[Any, Any]:
        """``(grads, values)`` of the batch ``(B, d)``: the traced graph for ``B`` (built on the
        first batch of that size) or ``torch.func.vmap``."""
        torch = require_torch("the torch bridge")
        traced = self.traced.get(batch.shape[0])
        if traced is not None:
            with torch.no_grad():
                return traced(batch)
        vmapped = torch.func.vmap(torch.func.grad_and_value(self.fn))
        if batch.shape[0] not in self.traced:
            if len(self.traced) == _MAX_TRACED_SIZES:
                self.traced.pop(next(iter(self.traced)))
            self.traced[batch.shape[0]] = _trace_batched(vmapped, batch)
        return vmapped(batch)

    def _to_torch(self, x: np.ndarray) -> Any:
        torch = require_torch("the torch bridge")
        flat = np.asarray(x).reshape(-1, self.dim)
        return torch.tensor(flat, dtype=self.dtype, device=self.device)

    def value(self, x: np.ndarray) -> np.ndarray:
        """``log p`` of every row of ``x`` (shape ``(..., d)``); shape ``(...)``."""
        torch = require_torch("the torch bridge")
        batch = self._to_torch(x)
        with torch.no_grad():
            values = torch.stack([self.fn(row).reshape(()) for row in batch])
        return _as_numpy(values, x.dtype, x.shape[:-1])

    def value_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(log p, grad log p)`` of every row of ``x``: shapes ``(...)`` and ``(..., d)``."""
        torch = require_torch("the torch bridge")
        batch = self._to_torch(x)
        if self.batching == "vmap":
            grads, values = self._vmapped(batch)
        else:
            batch.requires_grad_(True)
            values = torch.stack([self.fn(row).reshape(()) for row in batch])
            (grads,) = torch.autograd.grad(values.sum(), batch)
        return _as_numpy(values, x.dtype, x.shape[:-1]), _as_numpy(grads, x.dtype, x.shape)


def _flat_logdensity(host: _HostLogDensity) -> Callable:
    """``f(x) -> scalar`` for ``x`` of shape ``(d,)``, with the one-round-trip custom VJP."""

    @jax.custom_vjp
    def f(x):
        shape = jax.ShapeDtypeStruct((), x.dtype)
        return host_callback(host.value, shape, x, vmap_method="expand_dims")

    def f_fwd(x):
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        value, grad = host_callback(host.value_and_grad, shapes, x, vmap_method="expand_dims")
        return value, grad

    def f_bwd(grad, cotangent):
        return (cotangent * grad,)

    f.defvjp(f_fwd, f_bwd)
    return f


class TorchLogDensity(eqx.Module):
    r"""A torch log density as a JAX function of a pytree position (see :func:`torch_logdensity`).

    ``self(position) = fn(ravel(position))``, a scalar in the position's dtype.
    """

    host: _HostLogDensity = eqx.field(static=True)
    unravel_fn: Callable = eqx.field(static=True)

    def __call__(self, position: PyTree) -> jax.Array:
        flat, _ = ravel_pytree(position)
        return _flat_logdensity(self.host)(flat)


def torch_logdensity(
    fn: Callable,
    example_position: PyTree,
    *,
    device: Any = None,
    dtype: Any = None,
    batching: str = "vmap",
) -> TorchLogDensity:
    r"""Make a torch log density callable (and differentiable) from JAX.

    Parameters
    ----------
    fn
        ``fn(x) -> log p(x)``: a torch function of one flat tensor ``x`` of shape ``(d,)``
        returning a scalar tensor, differentiable by torch autograd.
    example_position
        A JAX pytree with the layout of one position (values unused); ``d`` is its raveled
        size (``jax.flatten_util.ravel_pytree``, dict keys sorted).
    device
        Torch device for the evaluation; default CPU.
    dtype
        Torch dtype of ``x`` inside ``fn``; default ``torch.float64``.
    batching
        How a vmapped batch ``(B, d)`` is evaluated: ``"vmap"`` (``torch.func.vmap`` of
        ``torch.func.grad_and_value``) or ``"loop"`` (``B`` forward calls, one backward).

    Returns
    -------
    TorchLogDensity
        ``logdensity_fn(position) -> scalar``. ``jax.value_and_grad`` of it costs one host round
        trip; under ``jax.vmap`` the whole batch goes to torch in that one trip.

    Examples
    --------
    >>> import torch, jax.numpy as jnp
    >>> fn = lambda x: -0.5 * (x**2).sum()
    >>> logdensity = emdppl.bridge.torch_logdensity(fn, jnp.zeros(3))
    >>> jax.value_and_grad(logdensity)(jnp.ones(3))  # (-1.5, [-1, -1, -1])
    """
    torch = require_torch("torch_logdensity")
    if not callable(fn):
        raise TypeError(f"fn must be a torch function of a flat tensor, got {type(fn).__name__}.")
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}, got {batching!r}.")
    flat, unravel = ravel_pytree(example_position)
    if flat.ndim != 1 or flat.shape[0] == 0:
        raise ValueError("example_position must hold at least one array element.")
    host = _HostLogDensity(
        fn,
        int(flat.shape[0]),
        torch.device("cpu") if device is None else torch.device(device),
        torch.float64 if dtype is None else dtype,
        batching,
    )
    return TorchLogDensity(host, unravel)
