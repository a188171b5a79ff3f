"""Deprecated: the Pyro support moved to :mod:`emdppl.bridge`; this shim goes in 0.3.

This module holds no code of its own: its four names are looked up in :mod:`emdppl.bridge` on
first use, with a ``DeprecationWarning``. Their homes: ``is_pyro_model`` and
``check_auxiliary_pyro`` in :mod:`emdppl.bridge.pyro_model`, ``target_from_pyro`` in
:mod:`emdppl.bridge.pyro_target`, ``pyro_svi_infer`` in :mod:`emdppl.bridge.pyro_svi`.
"""

from __future__ import annotations

import warnings
from typing import Any

from emdppl import bridge

_MOVED = ("check_auxiliary_pyro", "is_pyro_model", "pyro_svi_infer", "target_from_pyro")
__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"emdppl.pyro is deprecated; use emdppl.bridge; it will be removed in 0.3 "
        f"(emdppl.pyro.{name} is emdppl.bridge.{name}).",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(bridge, name)
