"""Kernels emdppl adds to blackjax's, each in blackjax's module contract."""

from emdppl.kernels import mala, ula

__all__ = ["mala", "ula"]
