"""Small image data sets bundled with their libraries (no download).

- :func:`load_digits`: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), scaled to
  ``[-1, 1]`` and split into training and held-out test images, stratified by class.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Digits", "load_digits"]


class Digits(NamedTuple):
    """The 8x8 digits, split in two.

    Attributes
    ----------
    train_images, test_images
        ``(n, 8, 8)`` float32 in ``[-1, 1]``: ``pixels / 8 - 1`` for the raw grey levels
        ``0, ..., 16``.
    train_labels, test_labels
        ``(n,)`` int64 classes ``0, ..., 9``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """scikit-learn's bundled 8x8 digits, split into training and test images.

    The split is stratified: in each class, ``round(test_fraction * n_class)`` images chosen at
    random (NumPy generator seeded with ``seed``) are test images, the rest training images. Both
    parts are returned in a seeded random order.

    Parameters
    ----------
    seed
        Seed of the split.
    test_fraction
        Share of each class held out, in ``(0, 1)``.

    Returns
    -------
    Digits
        With ``seed=0, test_fraction=0.2``: 1438 training and 359 test images.

    Examples
    --------
    >>> digits = load_digits(seed=0)
    >>> digits.train_images.shape, digits.test_images.shape
    ((1438, 8, 8), (359, 8, 8))
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as err:
        raise ImportError(
            "emdppl.datasets.load_digits reads the digits bundled with scikit-learn; "
            "install it with `pip install scikit-learn` (or `pip install emdppl[dev]`)."
        ) from err
    bunch = sklearn_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 8.0 - 1.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)

    rng = np.random.default_rng(seed)
    test_index = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_index.append(members[: int(round(test_fraction * members.size))])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test_index)] = True
    train = rng.permutation(np.flatnonzero(~is_test))
    test = rng.permutation(np.flatnonzero(is_test))
    return Digits(images[train], labels[train], images[test], labels[test])
