"""Kernels emdppl adds to blackjax's, each in blackjax's module contract."""

from emdppl.kernels import ula

__all__ = ["ula"]
