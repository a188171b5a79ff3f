r"""Torch networks as emdppl teachers: :func:`from_torch` and :class:`TorchTeacher`.

A torch denoiser or noise-prediction network becomes an
:class:`~emdppl.teachers.AbstractTeacher` on the project's VE schedule (:mod:`emdppl.schedule`):
its score is evaluated by torch on the host through
:func:`~emdppl.bridge.callback.host_callback`, one batch per
vmapped call, and differentiated in ``x`` by a second round trip (torch autograd). The module
also holds the host side, ``_HostScore``, and the JAX side, ``_bridged_score``.

torch is imported lazily (:func:`emdppl.bridge.callback.require_torch`); reach this module as
``emdppl.bridge.from_torch`` (``emdppl.teachers.from_torch`` is a deprecated alias).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from emdppl.bridge.callback import check_devices, host_callback, require_torch
from emdppl.schedule import SIGMA_MAX, SIGMA_MIN
from emdppl.teachers import AbstractTeacher

__all__ = ["TorchTeacher", "from_torch"]

PREDICTIONS = ("epsilon", "denoiser")


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
    """``score(x, sigma)`` through ``host_callback``, differentiable in ``x`` (not in sigma)."""

    def call(x, sigma):
        sigma = jnp.asarray(sigma, x.dtype)
        return host_callback(
            host.score,
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            x,
            sigma,
            vmap_method="broadcast_all",
        )

    @jax.custom_vjp
    def score(x, sigma):
        return call(x, sigma)

    def score_fwd(x, sigma):
        return call(x, sigma), (x, sigma)

    def score_bwd(residuals, cotangent):
        x, sigma = residuals
        grad = host_callback(
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
