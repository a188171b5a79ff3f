"""The benchmark scripts run end to end (``--smoke``) and write JSON with finite numbers.

The scripts start together in subprocesses (each spends most of its time compiling), so the
set takes about as long as the slowest one: 2-3 minutes on 2 cores.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {
    "first_call": ("results",),
    "nuts_speed": ("results",),
    "samplers": ("rows", "aux_vs_centered"),
}


def _numbers(value):
    """Every int/float leaf of a JSON value (bools and None excluded)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _run_smoke(out: pathlib.Path, scripts: dict) -> dict:
    """Start every script with ``--smoke`` at once; ``{name: (returncode, log, json path)}``."""
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out / name)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in scripts
    }
    logs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    return {
        name: (processes[name].returncode, logs[name], out / name / f"{name}.json")
        for name in scripts
    }


def _check_report(reports: dict, name: str, keys: tuple) -> None:
    returncode, log, path = reports[name]
    assert returncode == 0, log[-3000:]
    assert path.exists() and path.with_suffix(".png").exists()
    report = json.loads(path.read_text())
    for key in ("settings", "machine", *keys):
        assert key in report, f"{name}.json lacks {key!r}"
    numbers = list(_numbers({k: report[k] for k in keys}))
    assert numbers
    assert all(math.isfinite(x) for x in numbers), f"{name}.json has non-finite numbers"


@pytest.fixture(scope="module")
def smoke_reports(tmp_path_factory):
    return _run_smoke(tmp_path_factory.mktemp("benchmarks"), SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_smoke_writes_finite_json(smoke_reports, name):
    _check_report(smoke_reports, name, SCRIPTS[name])


def test_samplers_smoke_rows(smoke_reports):
    report = json.loads(smoke_reports["samplers"][2].read_text())
    cells = {(r["model"], r["sampler"], r["form"]) for r in report["rows"]}
    assert cells == {
        ("banana", sampler, form)
        for sampler in ("mala", "ula")
        for form in ("centered", "auxiliary")
    } | {("banana", "numpyro_nuts", "auxiliary")}
    for row in report["rows"]:
        for key in (
            "ess_bulk_per_second",
            "ess_tail_per_second",
            "ess_bulk_per_1000_grads",
            "ess_tail_per_1000_grads",
            "rhat_max",
            "max_abs_z",
            "sd_ratio_min",
            "sd_ratio_max",
            "compile_seconds",
            "run_seconds",
            "bulk_per_second_vs_numpyro",
        ):
            assert math.isfinite(row[key]), (row["sampler"], row["form"], key)
        assert row["flag"] in ("ok", "biased", "unconverged")
        assert (row["step_size"] is not None) == (row["sampler"] == "ula")
    assert {c["sampler"] for c in report["aux_vs_centered"]} == {"mala", "ula"}


# inference.py, distillation.py and emd_cost.py: their own subprocess set (each smoke run is
# ~55 s of CPU, almost all compilation; on a loaded 2-core machine up to 3 minutes of wall time).
EMD_SCRIPTS = {"inference": ("rows",), "distillation": ("rows",), "emd_cost": ("rows",)}


@pytest.fixture(scope="module")
def emd_smoke_reports(tmp_path_factory):
    return _run_smoke(tmp_path_factory.mktemp("emd_benchmarks"), EMD_SCRIPTS)


@pytest.mark.parametrize("name", sorted(EMD_SCRIPTS))
def test_emd_smoke_writes_finite_json(emd_smoke_reports, name):
    _check_report(emd_smoke_reports, name, EMD_SCRIPTS[name])


def test_inference_smoke_rows(emd_smoke_reports):
    report = json.loads(emd_smoke_reports["inference"][2].read_text())
    assert {(r["model"], r["method"]) for r in report["rows"]} == {
        ("banana", m) for m in ("mcmc", "svi", "emd")
    }
    for row in report["rows"]:
        for key in ("wall_seconds", "max_abs_z", "max_std_error", "sd_ratio_min",
                    "sd_ratio_max", "extra_10k_seconds", "extra_10k_effective_seconds",
                    "extra_vs_emd"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["method"], key)


def test_distillation_smoke_rows(emd_smoke_reports):
    report = json.loads(emd_smoke_reports["distillation"][2].read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["reference", "ddim_nfe1", "ddim_nfe2", "diff_instruct", "emd"]
    for row in report["rows"]:
        for key in ("energy_distance", "min_mass_ratio", "off_mode_fraction", "tv_mode_masses"):
            assert math.isfinite(row[key]), (row["method"], key)
        if row["method"] in ("diff_instruct", "emd"):
            assert row["nfe"] == 1
            for key in ("seconds_per_10k_samples", "train_seconds_per_1000_steps"):
                assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)


def test_emd_cost_smoke_rows(emd_smoke_reports):
    """The parts of a step are counted as the kernel runs them (K kernel steps, the residual)
    and every part was timed; the ratio itself is a measurement, not asserted."""
    (row,) = json.loads(emd_smoke_reports["emd_cost"][2].read_text())["rows"]
    assert (row["problem"], row["K"]) == ("ring8", 4)
    assert row["counts"]["teacher_score"] == row["counts"]["student_score"] == 5
    assert row["counts"]["generator_vjp"] == 4
    assert all(t > 0 for t in row["part_ms"].values()) and row["ratio"] > 0
