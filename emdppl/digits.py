r"""The 8x8-digits experiment: a diffusion model of images distilled into a one-step generator.

:func:`run_digits` trains an EDM-preconditioned teacher on scikit-learn's digits
(:func:`emdppl.datasets.load_digits`) by denoising score matching, samples it with its own
multi-step sampler (DDIM and EDM Heun at several NFE), distils it into one-step generators by
Diff-Instruct and by EMD (the library's defaults; :func:`emdppl.generators.from_teacher`), does
the same with a torch twin of the teacher (a plain ``torch.nn`` denoiser trained here on the same
data, wrapped by :func:`emdppl.bridge.from_torch`), and measures every set of images with
:class:`emdppl.image_metrics.Evaluator` (FID on a digits classifier's features, k-NN precision and
recall, class coverage) and the wall time of training and of sampling 10,000 images.

Images are flat vectors of ``d = 64`` pixels in ``[-1, 1]`` inside emdppl; they are clipped to
``[-1, 1]`` and reshaped to ``(N, 8, 8)`` for measuring and saving.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emdppl import datasets, generators, image_metrics, schedule, teachers
from emdppl.base import as_key
from emdppl.distill_config import DistillConfig
from emdppl.distillation import DistillResult, distill
from emdppl.timing import seconds_per_10k

__all__ = [
    "as_images",
    "DISTILL_SIZE",
    "IMAGE_SHAPE",
    "NUM_IMAGES",
    "SAMPLERS",
    "TEACHER_SAMPLERS",
    "TEACHER_SIZE",
    "format_table",
    "run_digits",
    "save_grid",
    "teacher_network",
    "train_torch_twin",
]

#: ``(C, H, W)`` of one digit.
IMAGE_SHAPE = (1, 8, 8)
#: The teacher's network: the MLP :class:`emdppl.teachers.EDMNetwork` (on a CPU a DSM step of
#: the small :class:`emdppl.networks.ConvDenoiser` costs 6-40x more, see ``benchmarks/README.md``).
TEACHER_WIDTH, TEACHER_DEPTH = 256, 3
#: DSM training of the teacher (and of its torch twin): ``(num_steps, batch_size)``.
#: Per scale: ``"full"`` (the experiment), ``"demo"`` (``emdppl demo``), ``"smoke"`` (tests).
TEACHER_SIZE = {"full": (6000, 256), "demo": (3000, 256), "smoke": (150, 128)}
#: Distillation size (the only training settings given to :func:`emdppl.distill`; the rest
#: are the library's defaults): ``(num_steps, batch_size, student_warmup_steps)``. The torch
#: teacher's run (``emd_torch_teacher``) is half as long: its score is a host callback.
DISTILL_SIZE = {"full": (2000, 128, 500), "demo": (600, 128, 200), "smoke": (20, 32, 20)}
#: The teacher's sampler as ``(solver, num_steps)``: DDIM at NFE 1, 2, 4, 8, 18, 35 and EDM Heun
#: at NFE 3, 7, 17, 35 (``2 num_steps - 1``).
TEACHER_SAMPLERS = tuple(("ddim", n) for n in (1, 2, 4, 8, 18, 35)) + tuple(
    ("heun", n) for n in (2, 4, 9, 18)
)
#: The teacher's samplers per scale.
SAMPLERS = {
    "full": TEACHER_SAMPLERS,
    "demo": (("ddim", 1), ("ddim", 18), ("heun", 18)),
    "smoke": (("ddim", 1), ("heun", 18)),
}
#: ``--sweep``: EMD's K values, and the seeds of the one-step methods.
SWEEP_K = (1, 2, 4, 8, 16)
SWEEP_SEEDS = (0, 1, 2)
#: Images drawn per row and measured, per scale.
NUM_IMAGES = {"full": 10_000, "demo": 2000, "smoke": 1000}


def teacher_network(rng_key: Any) -> teachers.EDMNetwork:
    """The teacher's raw network ``F(x_in (64,), c_noise) -> (64,)``."""
    return teachers.EDMNetwork(
        int(np.prod(IMAGE_SHAPE)), key=as_key(rng_key), width=TEACHER_WIDTH, depth=TEACHER_DEPTH
    )


def as_images(x: Any) -> np.ndarray:
    """Flat draws ``(N, 64)`` as images ``(N, 8, 8)``, clipped to ``[-1, 1]`` (numpy)."""
    return np.clip(np.asarray(x, np.float32), -1.0, 1.0).reshape(-1, *IMAGE_SHAPE[1:])


def train_torch_twin(
    images: np.ndarray,
    *,
    sigma_data: float,
    num_steps: int,
    batch_size: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
) -> Any:
    r"""The teacher's torch twin: a plain ``torch.nn`` EDM denoiser trained here by DSM.

    ``module(x (B, 1, 8, 8), sigma (B,)) -> D (B, 1, 8, 8)``,
    :math:`D = c_{skip} x + c_{out} F(c_{in} x, c_{noise})` (:func:`emdppl.schedule.edm_scalings`)
    with ``F`` an MLP of the same size as the JAX teacher's (SiLU, Fourier features of
    :math:`c_{noise}`), trained on ``images (n, 8, 8)`` with EDM's loss and noise distribution
    and Adam with cosine decay, as :func:`emdppl.teachers.train_diffusion`. For
    :func:`emdppl.bridge.from_torch` with ``prediction="denoiser"``, ``schedule="ve"``.
    """
    import torch

    d = int(np.prod(IMAGE_SHAPE))

    class Denoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, width = [], d + 17
            for _ in range(TEACHER_DEPTH):
                layers += [torch.nn.Linear(width, TEACHER_WIDTH), torch.nn.SiLU()]
                width = TEACHER_WIDTH
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, d))
            self.register_buffer("frequencies", torch.arange(1, 9, dtype=torch.float32))

        def forward(self, x: Any, sigma: Any) -> Any:
            flat, sigma = x.reshape(x.shape[0], d), sigma.reshape(-1, 1)
            total = sigma**2 + sigma_data**2
            c_noise = 0.25 * torch.log(sigma)
            angles = self.frequencies * c_noise
            features = torch.cat(
                [flat / torch.sqrt(total), c_noise, torch.sin(angles), torch.cos(angles)], 1
            )
            out = sigma_data**2 / total * flat + sigma * sigma_data / torch.sqrt(total) * self.net(
                features
            )
            return out.reshape(x.shape)

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = Denoiser()
    data = torch.as_tensor(np.asarray(images, np.float32).reshape(-1, d))
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, num_steps, eta_min=0.05 * learning_rate
    )
    p_mean = -1.2 + np.log(sigma_data / 0.5)
    for _ in range(num_steps):
        x = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        sigma = torch.exp(p_mean + 1.2 * torch.randn(batch_size, generator=generator))
        noise = torch.randn(x.shape, generator=generator)
        denoised = module(x + sigma[:, None] * noise, sigma)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        loss = torch.mean(weight * torch.sum((denoised - x) ** 2, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return module.eval()


def save_grid(rows: dict[str, tuple[np.ndarray, float]], path: Path) -> None:
    """One row per label: 10x10 digits from ``images (N >= 100, 8, 8)``, captioned
    ``label, FID``; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(3.4, 3.7 * len(rows)), squeeze=False)
    for ax, (label, (images, fid)) in zip(axes[:, 0], rows.items(), strict=True):
        tiles = np.pad(images[:100], ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
        mosaic = tiles.reshape(10, 10, 10, 10).transpose(0, 2, 1, 3).reshape(100, 100)
        ax.imshow(-mosaic, cmap="gray", vmin=-1, vmax=1)
        ax.set(xticks=[], yticks=[])
        ax.set_title(f"{label}: FID {fid:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(metrics: dict) -> str:
    """The rows of :func:`run_digits`' ``metrics`` as a fixed-width text table."""
    lines = [
        "{:22} {:>7} {:>6} {:>6} {:>7} {:>4} {:>8} {:>7}".format(
            "method", "FID", "prec", "recall", "cov min", "NFE", "train s", "s/10k"
        )
    ]
    for name, row in metrics.items():
        if not (isinstance(row, dict) and "fid" in row):
            continue
        lines.append(
            f"{name:22} {row['fid']:7.3f} {row['precision']:6.3f} {row['recall']:6.3f} "
            f"{row['class_coverage_min']:7.3f} {row.get('nfe', 0):4d} "
            f"{row.get('train_seconds', float('nan')):8.1f} "
            f"{row.get('seconds_per_10k', float('nan')):7.3f}"
        )
    return "\n".join(lines)


class _Recorder:
    """Measures image sets, keeps the metrics and writes ``metrics.json`` after every row."""

    def __init__(self, out_dir: Path, evaluator: Any, extra: dict):
        self.out_dir, self.evaluator = out_dir, evaluator
        self.metrics: dict = dict(extra)

    def add(
        self,
        name: str,
        images: np.ndarray,
        *,
        nfe: int,
        train_seconds: float,
        seconds: float,
        save: bool = False,
        **extra: Any,
    ) -> dict:
        scores = self.evaluator(images)
        row = {
            "fid": float(scores["fid"]),
            "precision": float(scores["precision"]),
            "recall": float(scores["recall"]),
            "class_coverage_min": float(scores["class_coverage_min"]),
            "class_coverage": [float(c) for c in scores["class_coverage"]],
            "nfe": int(nfe),
            "train_seconds": float(train_seconds),
            "seconds_per_10k": float(seconds),
            **extra,
        }
        self.metrics[name] = row
        if save:
            np.save(self.out_dir / f"samples_{name}.npy", images)
        self.write()
        return row

    def write(self) -> None:
        (self.out_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2))


def _distill(
    teacher: teachers.AbstractTeacher,
    generator: generators.AbstractGenerator,
    method: str,
    size: tuple[int, int, int],
    rng_key: Any,
    checkpoint_dir: Path,
    progress_bar: bool,
    **options: Any,
) -> tuple[DistillResult, float]:
    num_steps, batch_size, warmup = size
    start = time.perf_counter()
    result = distill(
        teacher,
        generator,
        method=method,
        num_steps=num_steps,
        batch_size=batch_size,
        student_warmup_steps=warmup,
        rng_key=rng_key,
        checkpoint_dir=checkpoint_dir,
        progress_bar=progress_bar,
        num_probe_draws=0,  # the E-step probes are diagnostics this experiment does not report
        **options,
    )
    return result, time.perf_counter() - start


def _one_step_row(
    recorder: _Recorder,
    name: str,
    result: DistillResult,
    train_seconds: float,
    rng_key: Any,
    num_images: int,
    save: bool,
) -> np.ndarray:
    images = as_images(result.sample(rng_key, num_images))
    seconds = seconds_per_10k(lambda r: result.sample(r, 10_000), rng_key)
    recorder.add(
        name,
        images,
        nfe=1,
        train_seconds=train_seconds,
        seconds=seconds,
        save=save,
        num_estep_steps=int(result.config.num_estep_steps),
        skipped_steps=int(result.state.num_skipped),
    )
    return images


def _sampler_rows(
    recorder: _Recorder,
    prefix: str,
    sample_fn: Callable[[Any, int, int, str], Any],
    samplers: tuple[tuple[str, int], ...],
    rng_key: Any,
    num_images: int,
    train_seconds: float,
) -> dict[str, np.ndarray]:
    """Rows ``{prefix}_{solver}_nfe{NFE}`` of ``sample_fn(key, n, num_steps, solver)``."""
    out = {}
    for solver, steps in samplers:
        nfe = schedule.num_function_evaluations(steps, solver)
        key = jax.random.fold_in(rng_key, 100 * nfe + (solver == "heun"))
        images = as_images(sample_fn(key, num_images, steps, solver))
        seconds = seconds_per_10k(lambda r, s=steps, v=solver: sample_fn(r, 10_000, s, v), key)
        name = f"{prefix}_{solver}_nfe{nfe}"
        save = solver == "heun" and steps == 18
        recorder.add(name, images, nfe=nfe, train_seconds=train_seconds, seconds=seconds, save=save)
        out[name] = images
    return out


def run_digits(
    out_dir: str | Path,
    *,
    scale: str = "full",
    sweep: bool = False,
    rng_key: int = 0,
    torch_teacher: bool = True,
    progress_bar: bool = True,
    distill_steps: int | None = None,
) -> dict:
    """Run the digits experiment; write ``metrics.json``, ``samples_<row>.npy`` and ``grid.png``.

    Parameters
    ----------
    out_dir
        Output folder (created). Checkpoints of the teacher and of every distillation go to
        ``out_dir/checkpoints``: a rerun resumes them, and ``metrics.json`` is rewritten after
        every row, so a cut-off run keeps the rows it finished.
    scale
        ``"full"`` (the experiment), ``"demo"`` (the short form ``emdppl demo`` runs) or
        ``"smoke"`` (a short run through every path): the sizes in :data:`TEACHER_SIZE`,
        :data:`DISTILL_SIZE`, :data:`NUM_IMAGES` and :data:`SAMPLERS`.
    sweep
        Add EMD for K in :data:`SWEEP_K` (rows ``emd_k{K}``) and seeds :data:`SWEEP_SEEDS` of
        both one-step methods (rows ``emd_seed{s}``, ``diff_instruct_seed{s}``).
    rng_key
        Seed of the data split, the evaluator, the teacher and the distillations.
    torch_teacher
        Also distil the torch twin of the teacher by EMD (row ``emd_torch_teacher``; needs
        torch).
    progress_bar
        Show tqdm bars.
    distill_steps
        Steps of every distillation (the torch teacher's: half), in place of the scale's
        :data:`DISTILL_SIZE`.

    Returns
    -------
    dict
        ``{row: {fid, precision, recall, class_coverage_min, class_coverage, nfe,
        train_seconds, seconds_per_10k, ...}}`` as written to ``metrics.json``, with rows
        ``floor`` (training vs test images), ``teacher_{ddim,heun}_nfe{NFE}``,
        ``generator_init`` (the one-step generator before distillation), ``diff_instruct``,
        ``emd`` and ``emd_torch_teacher``.

    Examples
    --------
    >>> metrics = emdppl.digits.run_digits("digits_out", scale="smoke")  # doctest: +SKIP
    >>> metrics["emd"]["fid"] < metrics["generator_init"]["fid"]  # doctest: +SKIP
    True
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scale not in NUM_IMAGES:
        raise ValueError(f"scale must be one of {sorted(NUM_IMAGES)}, got {scale!r}.")
    num_images = NUM_IMAGES[scale]
    teacher_steps, teacher_batch = TEACHER_SIZE[scale]
    distill_size = DISTILL_SIZE[scale]
    if distill_steps is not None:
        if distill_steps < 1:
            raise ValueError(f"distill_steps must be >= 1, got {distill_steps}.")
        distill_size = (int(distill_steps), *distill_size[1:])
    key = as_key(rng_key)
    k_teacher, k_sample, k_generator, k_distill, k_torch = jax.random.split(key, 5)

    digits = datasets.load_digits(seed=rng_key)
    evaluator = image_metrics.Evaluator.fit(digits, rng_key=rng_key)
    recorder = _Recorder(
        out_dir,
        evaluator,
        {
            "settings": {
                "teacher": {
                    "num_steps": teacher_steps,
                    "batch_size": teacher_batch,
                    "width": TEACHER_WIDTH,
                    "depth": TEACHER_DEPTH,
                },
                "distill": dict(
                    zip(
                        ("num_steps", "batch_size", "student_warmup_steps"),
                        distill_size,
                        strict=True,
                    )
                ),
                "num_images": num_images,
                "evaluator_accuracy": float(evaluator.accuracy),
            }
        },
    )
    floor = evaluator.floor(digits)
    recorder.metrics["floor"] = {
        name: floor[name] for name in ("fid", "precision", "recall", "class_coverage_min")
    }
    recorder.write()

    data = digits.train_images.reshape(len(digits.train_images), -1)
    start = time.perf_counter()
    teacher = teachers.train_diffusion(
        data,
        rng_key=k_teacher,
        num_steps=teacher_steps,
        batch_size=teacher_batch,
        network=teacher_network(jax.random.fold_in(k_teacher, 1)),
        progress_bar=progress_bar,
        checkpoint_dir=out_dir / "checkpoints" / "teacher",
    )
    teacher_seconds = time.perf_counter() - start
    samplers = SAMPLERS[scale]
    teacher_images = _sampler_rows(
        recorder,
        "teacher",
        lambda r, n, s, v: teacher.sample(r, n, num_steps=s, solver=v),
        samplers,
        k_sample,
        num_images,
        teacher_seconds,
    )

    generator = generators.from_teacher(teacher, key=k_generator)
    init_images = as_images(
        jax.vmap(generator)(
            jax.random.normal(jax.random.fold_in(k_sample, 1), (num_images, generator.latent_dim))
        )
    )
    recorder.add("generator_init", init_images, nfe=1, train_seconds=0.0, seconds=float("nan"))

    runs = [("diff_instruct", "diff_instruct", {}, 0), ("emd", "emd", {}, 0)]
    if sweep:
        default_k = DistillConfig().num_estep_steps  # the "emd" row
        runs += [(f"emd_k{k}", "emd", {"num_estep_steps": k}, 0) for k in SWEEP_K if k != default_k]
        runs += [
            (f"{method}_seed{seed}", method, {}, seed)
            for seed in SWEEP_SEEDS[1:]
            for method in ("diff_instruct", "emd")
        ]
    one_step = {}
    for name, method, options, seed in runs:
        result, seconds = _distill(
            teacher,
            generator,
            method,
            distill_size,
            jax.random.fold_in(k_distill, seed),
            out_dir / "checkpoints" / name,
            progress_bar,
            **options,
        )
        one_step[name] = _one_step_row(
            recorder,
            name,
            result,
            seconds,
            jax.random.fold_in(k_sample, 2 + seed),
            num_images,
            save=name in ("diff_instruct", "emd"),
        )

    if sweep:
        recorder.metrics[f"emd_k{default_k}"] = recorder.metrics["emd"]
        recorder.write()
    if torch_teacher:
        _torch_row(
            recorder,
            digits,
            teacher,
            generator,
            teacher_size=(teacher_steps, teacher_batch),
            distill_size=distill_size,
            rng_key=k_torch,
            out_dir=out_dir,
            num_images=num_images,
            progress_bar=progress_bar,
        )

    heun = f"teacher_heun_nfe{schedule.num_function_evaluations(18, 'heun')}"
    grid = {"teacher Heun NFE 35": (teacher_images[heun], recorder.metrics[heun]["fid"])}
    for name, label in (("emd", "EMD, 1 step"), ("diff_instruct", "Diff-Instruct, 1 step")):
        grid[label] = (one_step[name], recorder.metrics[name]["fid"])
    save_grid(grid, out_dir / "grid.png")
    return recorder.metrics


@contextlib.contextmanager
def _one_torch_thread():
    """Run torch on one intra-op thread: the twin is too small to gain from more, and torch's
    threads compete with JAX's for the cores (``benchmarks/README.md``, digits)."""
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num_threads)


def _torch_row(
    recorder: _Recorder,
    digits: Any,
    teacher: teachers.DiffusionModel,
    generator: generators.AbstractGenerator,
    *,
    teacher_size: tuple[int, int],
    distill_size: tuple[int, int, int],
    rng_key: Any,
    out_dir: Path,
    num_images: int,
    progress_bar: bool,
) -> None:
    """Row ``emd_torch_teacher``: the torch twin trained and distilled by EMD, starting from the
    same generator and student as ``emd`` (the twin's weights live in torch, so they cannot be
    copied into JAX networks; the teacher's score is the twin's, through ``from_torch``)."""
    from emdppl.bridge import from_torch

    with _one_torch_thread():
        start = time.perf_counter()
        module = train_torch_twin(
            digits.train_images,
            sigma_data=teacher.sigma_data,
            num_steps=teacher_size[0],
            batch_size=teacher_size[1],
            seed=int(jax.random.randint(rng_key, (), 0, 2**31 - 1)),
        )
        twin_seconds = time.perf_counter() - start
        twin = from_torch(
            module, prediction="denoiser", sample_shape=IMAGE_SHAPE, sigma_data=teacher.sigma_data
        )
        result, seconds = _distill(
            twin,
            generator,
            "emd",
            (max(1, distill_size[0] // 2), *distill_size[1:]),
            jax.random.fold_in(rng_key, 1),
            out_dir / "checkpoints" / "emd_torch_teacher",
            progress_bar,
            student=teacher,
        )
        _one_step_row(
            recorder,
            "emd_torch_teacher",
            result,
            seconds,
            jax.random.fold_in(rng_key, 2),
            num_images,
            save=False,
        )
        recorder.metrics["emd_torch_teacher"]["torch_teacher_train_seconds"] = twin_seconds
        recorder.write()
