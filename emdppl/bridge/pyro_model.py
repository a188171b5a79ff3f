r"""Pyro models: recognising them, their auxiliary form, and the traces the bridge reads.

This module holds :func:`is_pyro_model` (a static check that imports neither torch nor pyro),
the auxiliary (non-centered) form of a Pyro model, :func:`auxiliary_pyro`, built with
``poutine.reparam`` and the family table of :mod:`emdppl.reparam`:

- loc-scale families (Normal, StudentT, Cauchy, Laplace, Logistic, Gumbel, SoftLaplace):
  ``LocScaleReparam(centered=0)``, :math:`\theta = \mu + \tau\,\theta_{\rm decentered}`;
- ``MultivariateNormal``: :math:`x = \mu + L\,x_{\rm decentered}`;
- scale families (HalfNormal, HalfCauchy, Exponential, Gamma): unit-scale
  :math:`\tau_{\rm decentered}` times the scale (or over the rate);
- ``TransformedDistribution`` (``LogNormal``, ...): ``TransformReparam`` of its base;

its per-site report :func:`check_auxiliary_pyro`, and the helpers that run a Pyro model
(arguments to torch, a seeded trace, its latent sites) for :mod:`emdppl.bridge.pyro_target`.

torch and pyro are imported only when a Pyro model is used; without them an ``ImportError``
names the extra to install, ``pip install 'emdppl[pyro]'``.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from emdppl.bridge.callback import INSTALL_HINT
from emdppl.reparam import (
    DECENTERED,
    Families,
    choose_reparam,
    families_of,
    site_report,
    unit_scale,
    unwrap,
)

__all__ = ["auxiliary_pyro", "check_auxiliary_pyro", "is_pyro_model"]

_MAX_DEPTH = 3
_EMPTY_CELL = object()


def require_pyro() -> tuple[Any, Any]:
    """Import and return ``(torch, pyro)``, or raise an ``ImportError`` naming the extra."""
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
    >>> emdppl.bridge.is_pyro_model(emdppl.models.eight_schools)
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
# The auxiliary strategy: emdppl.reparam's choices, Pyro's reparameterizers.


@functools.cache
def _families() -> Families:
    import pyro.distributions as dist
    import torch.distributions as torch_dist

    return families_of(dist, torch_dist.MultivariateNormal, torch_dist.TransformedDistribution)


def unwrap_pyro(fn: Any) -> Any:
    """A Pyro distribution without its ``Independent`` / ``ExpandedDistribution`` wrappers."""
    return unwrap(fn, _families())


@functools.cache
def _reparams() -> dict[str, Callable[[Any], Any]]:
    """Each form of :func:`emdppl.reparam.choose_form` to a Pyro reparameterizer's constructor
    (the classes are built on first use, when pyro is present)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.reparam import LocScaleReparam, TransformReparam
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
            base = unwrap_pyro(fn)
            raw = pyro.sample(
                msg["name"] + DECENTERED,
                dist.Normal(torch.zeros_like(fn.mean), 1.0).to_event(fn.event_dim),
            )
            value = base.loc + (base.scale_tril @ raw.unsqueeze(-1)).squeeze(-1)
            return deterministic(value, fn.event_dim)

    class ScaleReparam(Reparam):
        r"""Non-center a scale family: :math:`\tau = s\,\tau_{\rm raw}` or
        :math:`\tau_{\rm raw}/r`."""

        def apply(self, msg):
            fn, event_dim = self._unwrap(msg["fn"])
            unit, scale, multiply = unit_scale(fn, _families(), torch.ones_like)
            raw = pyro.sample(msg["name"] + DECENTERED, self._wrap(unit, event_dim))
            return deterministic(raw * scale if multiply else raw / scale, event_dim)

    class BaseTransformReparam(TransformReparam):
        """Pyro's ``TransformReparam``, also for a Pyro distribution whose base is a plain torch
        one (``dist.Pareto``'s ``torch.distributions.Exponential``): the base is given its Pyro
        class (a subclass that adds no state), which Pyro's sample sites need."""

        def _wrap(self, fn, event_dim):
            pyro_class = getattr(dist, type(fn).__name__, None)
            if not hasattr(fn, "event_dim") and pyro_class and issubclass(pyro_class, type(fn)):
                fn = copy.copy(fn)
                fn.__class__ = pyro_class
            return super()._wrap(fn, event_dim)

    loc_scale = _families().loc_scale
    return {
        "loc_scale": lambda fn: LocScaleReparam(centered=0.0, shape_params=loc_scale[type(fn)]),
        "multivariate_normal": lambda fn: MultivariateNormalReparam(),
        "scale": lambda fn: ScaleReparam(),
        "transform": lambda fn: BaseTransformReparam(),
    }


def _choose(msg: dict) -> tuple[Any, str]:
    """The Pyro reparameterizer for a sample site and a one-line reason for the choice."""
    return choose_reparam(msg, _families(), _reparams())


def is_discrete(fn: Any) -> bool:
    """Whether a Pyro distribution is discrete (gradient-based samplers cannot move it)."""
    return bool(fn.support.is_discrete or fn.has_enumerate_support)


def _strategy(msg: dict) -> Any:
    if msg["type"] != "sample" or msg["is_observed"] or is_discrete(msg["fn"]):
        return None
    return _choose(msg)[0]


def auxiliary_pyro(model: Callable) -> Callable:
    """Return the Pyro ``model`` in auxiliary (non-centered) form (module docstring).

    Examples
    --------
    >>> aux = emdppl.bridge.pyro_model.auxiliary_pyro(model)  # doctest: +SKIP
    """
    from pyro import poutine

    return poutine.reparam(model, config=_strategy)


# ------------------------------------------------------------------------------------------
# Arguments, traces, the report.


def model_dtype(model: Any, model_args: tuple, model_kwargs: dict) -> Any:
    """The floating dtype the model computes in: that of its floating tensors (arguments and a
    module's parameters; promoted if they differ), else torch's default (float32, as Pyro users
    write models)."""
    import torch

    tensors = [*model_args, *model_kwargs.values()]
    if isinstance(model, torch.nn.Module):
        tensors += list(model.parameters())
    dtypes = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not dtypes:
        return torch.get_default_dtype()
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def to_torch_args(model_args: tuple, model_kwargs: dict) -> tuple[tuple, dict]:
    """numpy and JAX arrays among the arguments become torch tensors (same dtype)."""
    import torch

    def convert(value):
        if isinstance(value, (np.ndarray, jax.Array)):
            return torch.as_tensor(np.asarray(value))
        return value

    return tuple(convert(a) for a in model_args), {k: convert(v) for k, v in model_kwargs.items()}


def trace_model(model: Callable, model_args: tuple, model_kwargs: dict, seed: int) -> Any:
    """One seeded run of a Pyro model, Pyro validation off: its ``poutine`` trace."""
    import pyro
    from pyro import poutine

    with poutine.seed(rng_seed=seed), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(*model_args, **model_kwargs)


def latent_sites(trace: Any) -> dict:
    """Latent sample sites of a Pyro trace (plates' subsample sites excluded)."""
    from pyro.poutine.subsample_messenger import _Subsample

    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
    }


def check_auxiliary_pyro(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    strict: bool = False,
) -> dict[str, dict[str, str]]:
    """Report what :func:`~emdppl.bridge.pyro_target.target_from_pyro` does to each latent site
    of a Pyro ``model``.

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
    >>> emdppl.bridge.check_auxiliary_pyro(model, model_args=(sigma, y))  # doctest: +SKIP
    {'mu': {'status': 'auxiliary', 'distribution': 'Normal', 'detail': ...}, ...}
    """
    require_pyro()
    model_args, model_kwargs = to_torch_args(tuple(model_args), dict(model_kwargs or {}))
    trace = trace_model(model, model_args, model_kwargs, 0)
    return site_report(latent_sites(trace), unwrap_pyro, is_discrete, _choose, strict=strict)
