"""Torch and Pyro in emdppl: torch functions called from JAX, Pyro models as targets.

Modules
-------
callback
    The host-callback / ``custom_vjp`` bridge and the torch log density
    (:func:`torch_logdensity`, :func:`require_torch`, :func:`check_devices`, ``INSTALL_HINT``).
aten
    Torch functions lowered to JAX op by op (:func:`lower_to_jax`, :class:`LoweredLogDensity`,
    :class:`LoweringError`): how a Pyro model's potential is compiled into the sampler.
torch_teacher
    Torch denoisers and noise predictors as teachers (:func:`from_torch`, :class:`TorchTeacher`).
pyro_model
    Recognising a Pyro model (:func:`is_pyro_model`, without importing torch or pyro), its
    auxiliary form by Pyro's reparam handlers, and :func:`check_auxiliary_pyro`.
pyro_target
    A Pyro model's posterior as a :class:`~emdppl.Target` (:func:`target_from_pyro`).
pyro_predictive
    A Pyro model's sites, plate dims, pointwise log likelihood and predictive draws, by Pyro's
    ``poutine`` and ``Predictive`` (what :class:`emdppl.Problem` asks for a Pyro model).
pyro_svi
    Pyro's own SVI on a Pyro model, InferenceData out (:func:`pyro_svi_infer`).

Importing this package imports neither torch nor pyro, nor any of its modules: each public name
is imported from its module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "INSTALL_HINT": "emdppl.bridge.callback",
    "TorchLogDensity": "emdppl.bridge.callback",
    "check_devices": "emdppl.bridge.callback",
    "require_torch": "emdppl.bridge.callback",
    "torch_logdensity": "emdppl.bridge.callback",
    "LoweredLogDensity": "emdppl.bridge.aten",
    "LoweringError": "emdppl.bridge.aten",
    "lower_to_jax": "emdppl.bridge.aten",
    "TorchTeacher": "emdppl.bridge.torch_teacher",
    "from_torch": "emdppl.bridge.torch_teacher",
    "check_auxiliary_pyro": "emdppl.bridge.pyro_model",
    "is_pyro_model": "emdppl.bridge.pyro_model",
    "target_from_pyro": "emdppl.bridge.pyro_target",
    "pyro_svi_infer": "emdppl.bridge.pyro_svi",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
