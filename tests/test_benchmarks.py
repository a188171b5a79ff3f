"""The benchmark scripts run end to end (``--smoke``) and write JSON with finite numbers.

Both scripts start together in subprocesses (each spends most of its time compiling), so the
pair takes about as long as the slower one: 2-3 minutes on 2 cores.
"""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {
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


@pytest.fixture(scope="module")
def smoke_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks")
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{name}", "--smoke", "--out", str(out / name)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in SCRIPTS
    }
    logs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    return {
        name: (processes[name].returncode, logs[name], out / name / f"{name}.json")
        for name in SCRIPTS
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_smoke_writes_finite_json(smoke_reports, name):
    returncode, log, path = smoke_reports[name]
    assert returncode == 0, log[-3000:]
    assert path.exists() and path.with_suffix(".png").exists()
    report = json.loads(path.read_text())
    for key in ("settings", "machine", *SCRIPTS[name]):
        assert key in report, f"{name}.json lacks {key!r}"
    numbers = list(_numbers({k: report[k] for k in SCRIPTS[name]}))
    assert numbers
    assert all(math.isfinite(x) for x in numbers), f"{name}.json has non-finite numbers"


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
