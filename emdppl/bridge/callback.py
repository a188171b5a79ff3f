r"""The torch-to-JAX callback bridge: a torch log density evaluated from jitted, vmapped JAX code.

This module holds :func:`torch_logdensity` (and its :class:`TorchLogDensity`), the host side
that runs torch, and the helpers the other bridge modules share: :func:`require_torch` and
:func:`check_devices`.

One mechanism carries everything: :func:`jax.pure_callback` inside :func:`jax.custom_vjp`.

- A **log density** :math:`\log p(x)`, :math:`x \in \mathbb{R}^d`, becomes a JAX function whose
  forward pass of a gradient (``jax.value_and_grad``, what every gradient-based sampler calls)
  is *one* host round trip returning :math:`(\log p(x), \nabla \log p(x))` from torch autograd;
  the backward pass is the product of the cotangent with that stored gradient. Plain calls
  (no gradient) compute the value only.
- ``vmap_method="expand_dims"``: under ``jax.vmap`` (chains, a batch of E-step particles) the
  callback receives the whole batch, shape ``(..., d)``, once per step, and torch evaluates it
  with ``torch.func.vmap`` (``batching="vmap"``) or a Python loop with a single backward pass
  (``batching="loop"``, for functions ``torch.func`` cannot transform).
- Torch computes in ``dtype`` (float64 by default, so float32 JAX inputs lose nothing) on
  ``device``; results come back in the JAX input's dtype.

``torch2jax``-style graph translation is not used: it cannot trace ``torch.distributions``,
which is what Pyro models are made of. Higher derivatives (Hessians) are not available.

torch is imported lazily: importing this module works without it, and calling these functions
without torch raises an ``ImportError`` naming the extra, ``pip install 'emdppl[pyro]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from emdppl.base import PyTree

__all__ = [
    "INSTALL_HINT",
    "TorchLogDensity",
    "check_devices",
    "require_torch",
    "torch_logdensity",
]

INSTALL_HINT = "pip install 'emdppl[pyro]'"
BATCHINGS = ("vmap", "loop")


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
        if self.batching == "vmap" and batch.shape[0] > 1:
            grads, values = torch.func.vmap(torch.func.grad_and_value(self.fn))(batch)
        else:
            batch.requires_grad_(True)
            values = torch.stack([self.fn(row).reshape(()) for row in batch])
            (grads,) = torch.autograd.grad(values.sum(), batch)
        return _as_numpy(values, x.dtype, x.shape[:-1]), _as_numpy(grads, x.dtype, x.shape)


def _flat_logdensity(host: _HostLogDensity) -> Callable:
    """``f(x) -> scalar`` for ``x`` of shape ``(d,)``, with the one-round-trip custom VJP."""

    @jax.custom_vjp
    def f(x):
        return jax.pure_callback(
            host.value, jax.ShapeDtypeStruct((), x.dtype), x, vmap_method="expand_dims"
        )

    def f_fwd(x):
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        value, grad = jax.pure_callback(host.value_and_grad, shapes, x, vmap_method="expand_dims")
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
