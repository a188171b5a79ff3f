r"""The torch-to-JAX bridge: torch functions evaluated from jitted, vmapped JAX code.

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

Teachers: :func:`from_torch` turns a torch denoiser or noise-prediction network into an
:class:`~emdppl.teachers.AbstractTeacher` on the project's VE schedule (:mod:`emdppl.schedule`).

torch is imported lazily: ``import emdppl`` works without it, and calling these functions
without torch raises an ``ImportError`` naming the extra, ``pip install 'emdppl[pyro]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from emdppl.base import PyTree
from emdppl.schedule import SIGMA_MAX, SIGMA_MIN
from emdppl.teachers import AbstractTeacher

__all__ = ["TorchLogDensity", "TorchTeacher", "from_torch", "require_torch", "torch_logdensity"]

INSTALL_HINT = "pip install 'emdppl[pyro]'"
BATCHINGS = ("vmap", "loop")
PREDICTIONS = ("epsilon", "denoiser")


def require_torch(what: str) -> Any:
    """Import and return ``torch``, or raise an ``ImportError`` naming the extra to install."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{what} needs PyTorch, which is not installed: {INSTALL_HINT}"
        ) from err
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
        return values.cpu().numpy().astype(x.dtype).reshape(x.shape[:-1])

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
        values = values.detach().cpu().numpy().astype(x.dtype).reshape(x.shape[:-1])
        grads = grads.detach().cpu().numpy().astype(x.dtype).reshape(x.shape)
        return values, grads


def _flat_logdensity(host: _HostLogDensity) -> Callable:
    """``f(x) -> scalar`` for ``x`` of shape ``(d,)``, with the one-round-trip custom VJP."""

    @jax.custom_vjp
    def f(x):
        return jax.pure_callback(
            host.value, jax.ShapeDtypeStruct((), x.dtype), x, vmap_method="expand_dims"
        )

    def f_fwd(x):
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        value, grad = jax.pure_callback(
            host.value_and_grad, shapes, x, vmap_method="expand_dims"
        )
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


# ------------------------------------------------------------------------------------------
# Teachers: torch denoisers and noise predictors on emdppl's VE schedule.


class _HostScore:
    r"""Host side of :class:`TorchTeacher`: the VE score of a torch network, and its VJP."""

    def __init__(
        self,
        module: Callable,
        prediction: str,
        sample_shape: tuple[int, ...],
        alphas_cumprod: np.ndarray | None,
        device: Any,
        dtype: Any,
    ):
        self.module = module
        self.prediction = prediction
        self.sample_shape = sample_shape
        self.dim = int(np.prod(sample_shape))
        self.device = device
        self.dtype = dtype
        if alphas_cumprod is None:
            self.log_sigmas = None
        else:
            self.log_sigmas = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)

    def _network_input(self, sigma: Any) -> tuple[Any, Any]:
        """``(input scale, time argument)`` of the network at VE noise levels ``sigma`` (B,)."""
        torch = require_torch("the torch teacher")
        if self.log_sigmas is None:
            return torch.ones_like(sigma), sigma
        steps = np.interp(
            np.log(sigma.detach().cpu().numpy()), self.log_sigmas, np.arange(len(self.log_sigmas))
        )
        timestep = torch.as_tensor(steps, dtype=self.dtype, device=self.device)
        return torch.rsqrt(1 + sigma**2), timestep

    def torch_score(self, x: Any, sigma: Any) -> Any:
        """VE score of a batch ``x`` (B, d) at ``sigma`` (B,), in torch."""
        scale, time = self._network_input(sigma)
        batch = x.shape[0]
        x_in = (scale[:, None] * x).reshape(batch, *self.sample_shape)
        out = self.module(x_in, time)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if tuple(out.shape) != (batch, *self.sample_shape):
            raise ValueError(
                f"the torch teacher returned shape {tuple(out.shape)} for an input of shape "
                f"{(batch, *self.sample_shape)}; a {self.prediction} prediction must have the "
                "input's shape. Check sample_shape and the module's output."
            )
        out = out.reshape(batch, self.dim)
        if self.prediction == "epsilon":
            return -out / sigma[:, None]
        return (out - x) / sigma[:, None] ** 2

    def _inputs(self, x: np.ndarray, sigma: np.ndarray) -> tuple[Any, Any]:
        torch = require_torch("the torch teacher")
        flat_x = torch.tensor(np.reshape(x, (-1, self.dim)), dtype=self.dtype)
        flat_sigma = torch.tensor(np.reshape(sigma, -1), dtype=self.dtype)
        return flat_x.to(self.device), flat_sigma.to(self.device)

    def score(self, x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Score of ``x`` (..., d) at ``sigma`` (...); shape ``(..., d)``."""
        torch = require_torch("the torch teacher")
        flat_x, flat_sigma = self._inputs(x, sigma)
        with torch.no_grad():
            out = self.torch_score(flat_x, flat_sigma)
        return out.cpu().numpy().astype(x.dtype).reshape(x.shape)

    def score_vjp(self, x: np.ndarray, sigma: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
        r""":math:`c^T \partial\,\mathrm{score} / \partial x`, cotangent ``c`` shaped like ``x``."""
        torch = require_torch("the torch teacher")
        flat_x, flat_sigma = self._inputs(x, sigma)
        flat_x.requires_grad_(True)
        out = self.torch_score(flat_x, flat_sigma)
        ct = torch.tensor(np.reshape(cotangent, out.shape), dtype=self.dtype, device=self.device)
        (grad,) = torch.autograd.grad(out, flat_x, ct)
        return grad.cpu().numpy().astype(x.dtype).reshape(x.shape)


def _bridged_score(host: _HostScore) -> Callable:
    """``score(x, sigma)`` through ``pure_callback``, differentiable in ``x`` (not in sigma)."""

    def call(x, sigma):
        sigma = jnp.asarray(sigma, x.dtype)
        return jax.pure_callback(
            host.score, jax.ShapeDtypeStruct(x.shape, x.dtype), x, sigma,
            vmap_method="broadcast_all",
        )

    @jax.custom_vjp
    def score(x, sigma):
        return call(x, sigma)

    def score_fwd(x, sigma):
        return call(x, sigma), (x, sigma)

    def score_bwd(residuals, cotangent):
        x, sigma = residuals
        grad = jax.pure_callback(
            host.score_vjp,
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            x,
            jnp.asarray(sigma, x.dtype),
            cotangent,
            vmap_method="broadcast_all",
        )
        return grad, jnp.zeros_like(sigma)

    score.defvjp(score_fwd, score_bwd)
    return score


class TorchTeacher(AbstractTeacher):
    r"""A torch network's diffused score on the VE schedule (built by :func:`from_torch`).

    ``score(x_t, sigma)`` for ``x_t`` of shape ``(d,)``, ``d = prod(sample_shape)``; vmapped
    calls reach torch as one batch. Differentiable in ``x_t`` (a second round trip, torch
    autograd); the network's parameters are constants.
    """

    host: _HostScore = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    sigma_min: float = eqx.field(static=True)
    sigma_max: float = eqx.field(static=True)

    def score(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        return _bridged_score(self.host)(x_t, sigma)


def from_torch(
    module: Callable,
    *,
    prediction: str = "epsilon",
    schedule: str | Any = "ve",
    sample_shape: tuple[int, ...],
    sigma_data: float = 0.5,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> TorchTeacher:
    r"""Wrap a torch denoiser or noise-prediction network as an emdppl teacher.

    emdppl's convention (:mod:`emdppl.schedule`) is variance exploding,
    :math:`x_\sigma = x + \sigma\varepsilon`, and a teacher returns the score
    :math:`\nabla\log p_\sigma(x_\sigma)`. The network is called as ``module(x_in, t)`` on a
    batch ``x_in`` of shape ``(B, *sample_shape)`` and returns a tensor of that shape (or an
    object with ``.sample``, or a tuple whose first element is it: diffusers' ``UNet2DModel``):

    - ``schedule="ve"``: :math:`x_{in} = x_\sigma`, :math:`t = \sigma` (shape ``(B,)``);
    - ``schedule=alphas_cumprod`` (1-D array of :math:`\bar\alpha_k`, variance preserving,
      e.g. ``diffusers.DDPMScheduler().alphas_cumprod``): the VP point with the same
      signal-to-noise ratio, :math:`x_{in} = x_\sigma / \sqrt{1 + \sigma^2}`, at the fractional
      step :math:`t` interpolating
      :math:`\log\sigma_k = \tfrac12\log((1-\bar\alpha_k)/\bar\alpha_k)`.

    In both, ``prediction="epsilon"`` means :math:`\hat\varepsilon(x_{in}, t) \approx \varepsilon`
    (the same noise as in :math:`x_\sigma = x + \sigma\varepsilon`), so
    :math:`\mathrm{score} = -\hat\varepsilon/\sigma`; ``prediction="denoiser"`` means
    :math:`D \approx E[x \mid x_\sigma]`, so :math:`\mathrm{score} = (D - x_\sigma)/\sigma^2`.

    Parameters
    ----------
    module
        A torch callable (``torch.nn.Module`` or function); evaluated under ``torch.no_grad``
        on the device and in the dtype of its parameters (CPU, float32 for a function).
    prediction
        ``"epsilon"`` or ``"denoiser"``.
    schedule
        ``"ve"`` or the VP ``alphas_cumprod`` array; see above.
    sample_shape
        Shape of one sample for the network, e.g. ``(2,)`` or ``(C, H, W)``; the teacher's
        ``data_dim`` is its product (emdppl works on flat vectors).
    sigma_data
        Data scale (EDM's :math:`\sigma_{data}`; 0.5 for images in ``[-1, 1]``).
    sigma_min, sigma_max
        Noise range where the score is trusted; default :mod:`emdppl.schedule`'s range
        (``"ve"``) or the range of ``alphas_cumprod``.

    Returns
    -------
    TorchTeacher
        Usable wherever a teacher is: :func:`emdppl.distill`, ``sample_ode``.

    Examples
    --------
    >>> net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1)  # doctest: +SKIP
    >>> teacher = emdppl.bridge.from_torch(
    ...     net, schedule=diffusers.DDPMScheduler().alphas_cumprod, sample_shape=(1, 8, 8)
    ... )  # doctest: +SKIP
    >>> teacher.score(jnp.zeros(64), 1.0).shape  # doctest: +SKIP
    (64,)
    """
    torch = require_torch("from_torch")
    if not callable(module):
        raise TypeError(f"module must be a torch callable, got {type(module).__name__}.")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
    sample_shape = tuple(int(n) for n in sample_shape)
    if not sample_shape or min(sample_shape) < 1:
        raise ValueError(f"sample_shape must be a non-empty shape, got {sample_shape}.")
    if isinstance(schedule, str):
        if schedule != "ve":
            raise ValueError(f"schedule must be 've' or an alphas_cumprod array, got {schedule!r}.")
        alphas_cumprod = None
        default_range = (SIGMA_MIN, SIGMA_MAX)
    else:
        alphas_cumprod = np.asarray(
            schedule.cpu() if isinstance(schedule, torch.Tensor) else schedule, dtype=np.float64
        )
        if alphas_cumprod.ndim != 1 or not np.all((alphas_cumprod > 0) & (alphas_cumprod < 1)):
            raise ValueError("alphas_cumprod must be a 1-D array of values in (0, 1).")
        if np.any(np.diff(alphas_cumprod) >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing (noise grows with t).")
        sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
        default_range = (float(sigmas[0]), float(sigmas[-1]))
    parameters = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    device = check_devices({f"parameter {i}": p for i, p in enumerate(parameters)})
    dtype = parameters[0].dtype if parameters else torch.float32
    host = _HostScore(module, prediction, sample_shape, alphas_cumprod, device, dtype)
    teacher = TorchTeacher(
        host,
        host.dim,
        float(sigma_data),
        float(default_range[0] if sigma_min is None else sigma_min),
        float(default_range[1] if sigma_max is None else sigma_max),
    )
    probe = host.score(np.zeros((2, host.dim), np.float32), np.ones(2, np.float32))
    if not np.all(np.isfinite(probe)):
        raise ValueError("the torch teacher's score is not finite at x = 0, sigma = 1.")
    return teacher

