"""The digits data set and the image evaluator: FID, precision/recall, class coverage."""

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

pytest.importorskip("sklearn")

from emdppl.datasets import load_digits  # noqa: E402
from emdppl.image_metrics import (  # noqa: E402
    Evaluator,
    class_coverage,
    frechet_distance,
    precision_recall,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def evaluator(digits):
    return Evaluator.fit(digits, rng_key=0)


@pytest.fixture(scope="module")
def floor(evaluator, digits):
    return evaluator.floor(digits)


def test_load_digits_split(digits):
    n_train, n_test = len(digits.train_labels), len(digits.test_labels)
    assert digits.train_images.shape == (n_train, 8, 8) and n_train + n_test == 1797
    assert digits.train_images.dtype == np.float32
    assert digits.train_images.min() == -1.0 and digits.train_images.max() == 1.0
    # pixels / 8 - 1 of the integer grey levels 0..16
    np.testing.assert_array_equal((digits.test_images + 1) * 8 % 1, 0)
    # stratified: each class holds round(0.2 n_c) test images
    counts = np.bincount(digits.train_labels) + np.bincount(digits.test_labels)
    np.testing.assert_array_equal(np.bincount(digits.test_labels), np.round(0.2 * counts))
    again, other = load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(again.test_images, digits.test_images)
    assert not np.array_equal(other.test_labels, digits.test_labels)


def test_classifier_held_out_accuracy(evaluator):
    assert evaluator.accuracy >= 0.97


def _with_exact_moments(rng, mean, cov, n):
    """n points whose sample mean and (ddof=1) covariance are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, mean.size))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mean_a, mean_b = rng.normal(size=d), rng.normal(size=d)
    m_a, m_b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov_a, cov_b = m_a @ m_a.T + 0.1 * np.eye(d), m_b @ m_b.T + 0.1 * np.eye(d)
    a = _with_exact_moments(rng, mean_a, cov_a, 200)
    b = _with_exact_moments(rng, mean_b, cov_b, 300)
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)

    # commuting (diagonal) covariances: sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2 + |mu_a - mu_b|^2
    var_a, var_b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    a = _with_exact_moments(rng, mean_a, np.diag(var_a), 200)
    b = _with_exact_moments(rng, mean_b, np.diag(var_b), 300)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)

    # identical sets, singular covariance (n < f): rounding only, relative to tr(S) ~ f
    x = rng.normal(size=(20, 64))
    assert frechet_distance(x, x) < 1e-8 * 64


def test_fid_of_real_images_far_below_noise(evaluator, floor, digits):
    noise = np.random.default_rng(0).uniform(-1, 1, size=(1000, 8, 8))
    assert 0 < floor["fid"] and 20 * floor["fid"] < evaluator(noise)["fid"]
    # The test set is stratified (each class 35-37 of 359 images, >= 0.975 of the uniform share):
    # a class falls below 0.9 only if at least 3 more of its images are misclassified than other
    # images are misclassified into it.
    predicted = np.asarray(evaluator.classifier.predict(digits.test_images))
    assert class_coverage(predicted).min() >= 0.9
    assert floor["class_coverage_min"] >= 0.9 and len(floor["class_coverage"]) == 10


def test_precision_recall_real_vs_real_and_mode_collapse(evaluator, floor, digits):
    # Two samples of the same distribution: most points of each lie in the other's manifold.
    assert floor["precision"] > 0.8 and floor["recall"] > 0.75
    # Only zeros (~1/10 of the data): each lies among real zeros (precision stays high), but
    # real images of the other nine classes are far from every fake point (recall ~ 0.1).
    zeros = evaluator(digits.train_images[digits.train_labels == 0])
    assert zeros["precision"] > 0.8 and zeros["recall"] < 0.2
    assert zeros["class_coverage_min"] == 0.0


def test_precision_recall_matches_brute_force():
    # sizes straddle the 512-row distance blocks; continuous data, so no radius ties
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 5)), rng.normal(0.3, 1.2, size=(700, 5))
    k = 3

    def share_inside(queries, points):
        radii = np.sort(cdist(points, points), axis=1)[:, k]
        return np.mean(np.any(cdist(queries, points) <= radii[None, :], axis=1))

    precision, recall = precision_recall(real, fake, k=k)
    assert precision == share_inside(fake, real) and recall == share_inside(real, fake)
    assert precision_recall(real, real, k=k) == (1.0, 1.0)


def test_class_coverage():
    np.testing.assert_allclose(class_coverage(np.array([0, 0, 1, 3]), 4), [2, 1, 0, 1])
    with pytest.raises(ValueError, match="lie in"):
        class_coverage(np.array([0, 10]))


def test_evaluator_input_checks(evaluator, digits):
    images = digits.train_images[:50]
    assert evaluator(images.reshape(50, 64)) == evaluator(images)
    with pytest.raises(ValueError, match="shape"):
        evaluator(images.reshape(50, 4, 16))
    with pytest.raises(ValueError, match="NaN"):
        evaluator(np.where(images == 1.0, np.nan, images))


def test_precision_recall_on_equal_sized_chunks(evaluator, digits):
    # 10,000 jittered copies of the training images (~7 per image) score like the training images
    # on chunks of the reference size; on one set of 10,000, each point's 3rd neighbour is one of
    # its own copies, the radii shrink to the jitter and recall collapses.
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(digits.train_images), size=10_000)
    copies = np.clip(digits.train_images[index] + 0.05 * rng.normal(size=(10_000, 8, 8)), -1, 1)
    chunked = evaluator(copies)
    assert chunked["recall"] > 0.75 and chunked["precision"] > 0.8
    whole = Evaluator(evaluator.classifier, digits.test_images, num_pr_images=10_000)(copies)
    assert whole["recall"] < 0.2
    assert whole["fid"] == chunked["fid"]
