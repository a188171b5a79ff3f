"""The 8x8-digits experiment (emdppl.digits): the script end to end, and distillation's gain."""

import json
import math
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emdppl
from emdppl import datasets, digits, generators, image_metrics, teachers

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("fid", "precision", "recall", "class_coverage_min", "nfe", "train_seconds")


def test_distill_digits_smoke_script(tmp_path):
    out = tmp_path / "digits"
    command = [sys.executable, str(ROOT / "examples" / "distill_digits.py"), "--smoke"]
    command += ["--out", str(out), "--no-progress", "--distill-steps", "12"]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["distill"]["num_steps"] == 12  # --distill-steps, not smoke's 20
    rows = ["floor", "teacher_heun_nfe35", "generator_init", "diff_instruct", "emd"]
    rows.append("emd_torch_teacher")
    for name in rows:
        assert name in metrics, name
        for key in ROW_KEYS if name != "floor" else ROW_KEYS[:4]:
            assert math.isfinite(metrics[name][key]), (name, key)
    for name in ("diff_instruct", "emd", "emd_torch_teacher"):
        assert metrics[name]["nfe"] == 1
        assert math.isfinite(metrics[name]["seconds_per_10k"])
    assert metrics["teacher_heun_nfe35"]["nfe"] == 35
    num_images = metrics["settings"]["num_images"]
    for name in ("teacher_heun_nfe35", "diff_instruct", "emd"):
        images = np.load(out / f"samples_{name}.npy")
        assert images.shape == (num_images, 8, 8)
        assert np.all(np.isfinite(images)) and images.min() >= -1 and images.max() <= 1
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_data():
    return datasets.load_digits(seed=0)


def test_distilled_generator_beats_its_initialisation(digits_data):
    """EMD for 150 steps on a short-trained teacher: the FID of 5 independent sets of 1000
    one-step images of the distilled generator are all below those of 5 sets of its
    initialisation. Under the null (same image distribution) the 10 FIDs are exchangeable and
    this ordering has probability 1 / C(10, 5) = 1/252 (one-sided rank test, p = 0.004)."""
    evaluator = image_metrics.Evaluator.fit(digits_data, rng_key=0)
    data = digits_data.train_images.reshape(len(digits_data.train_images), -1)
    teacher = teachers.train_diffusion(
        data,
        rng_key=0,
        num_steps=1500,
        batch_size=128,
        network=digits.teacher_network(jax.random.key(1)),
        progress_bar=False,
    )
    generator = generators.from_teacher(teacher, key=jax.random.key(2))
    result = emdppl.distill(
        teacher,
        generator,
        method="emd",
        num_steps=150,
        batch_size=64,
        student_warmup_steps=100,
        num_probe_draws=0,
        rng_key=3,
        progress_bar=False,
    )
    initial = emdppl.DistillResult(generator, None, {}, None, result.state)

    def fids(res, seed):
        keys = jax.random.split(jax.random.key(seed), 5)
        return [evaluator(digits.as_images(res.sample(k, 1000)))["fid"] for k in keys]

    before, after = fids(initial, 4), fids(result, 5)
    assert max(after) < min(before), (before, after)


def test_conv_denoiser_is_generic_in_image_shape():
    """A (C, H, W) = (3, 4, 6) network maps flat (72,) inputs to (72,), its blocks start as the
    identity, and a pixel's output depends on a pixel 5 away only through the receptive field
    (4 depth + 5 = 13 pixels wide at depth 2): the input gradient there is non-zero."""
    from emdppl.networks import ConvDenoiser

    net = ConvDenoiser((3, 4, 6), key=jax.random.key(0), width=16, depth=2)
    x = jax.random.normal(jax.random.key(1), (72,))
    out = net(x, jnp.asarray(0.3))
    assert out.shape == (72,) and bool(jnp.all(jnp.isfinite(out)))
    h = net.conv_in(x.reshape(3, 4, 6))
    for block in net.blocks:
        assert jnp.allclose(block(h, jnp.ones(64)), h)
    # non-zero blocks: perturb conv_2 so that information travels through them
    net = jax.tree.map(lambda a: a + 0.1 if eqx.is_inexact_array(a) else a, net)
    grad = jax.grad(lambda v: net(v, jnp.asarray(0.3)).reshape(3, 4, 6)[0, 0, 0])(x)
    assert float(jnp.abs(grad.reshape(3, 4, 6)[:, 3, 5]).max()) > 0
