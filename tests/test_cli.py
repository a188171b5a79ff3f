"""The console script: `emdppl samplers` lists the registry; `emdppl --version` prints the
installed version; bad commands fail with usage."""

import importlib.metadata

import pytest

import emdppl
from emdppl.cli import main


def test_samplers_command_lists_the_registry(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:4] for line in out[1:]}
    assert sorted(rows) == emdppl.samplers()
    assert rows["nuts"][:2] == ["exact", "logdensity"]
    assert rows["ula"][:3] == ["unadjusted", "gradient", "1"]


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--version"])
    assert err.value.code == 0
    assert capsys.readouterr().out == f"emdppl {emdppl.__version__}\n"
    assert importlib.metadata.version("emdppl") == emdppl.__version__


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["sample-everything"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_smoke_writes_tables_plots_and_metrics(tmp_path, capsys):
    """`emdppl demo --smoke`: the README's main job, end to end (about a minute)."""
    import json

    assert main(["demo", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eight schools NUTS, auxiliary" in out and "ring8    diff_instruct" in out
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    schools = metrics["eight_schools"]
    assert set(schools) == {"auxiliary", "centered"}
    # the auxiliary form mixes: R-hat near 1 even at 200 + 200 draws (seed 0)
    assert schools["auxiliary"]["max_r_hat"] < 1.05
    rows = metrics["distillation"]["ring8"]
    assert list(rows) == ["exact", "ddim_nfe1", "ddim_nfe2", "emd", "diff_instruct"]
    assert [rows[r]["nfe"] for r in rows] == [0, 1, 2, 1, 1]
    # exact vs exact draws is the floor; one DDIM step from sigma 80 is the mixture mean
    assert rows["exact"]["energy_distance"] < 0.05 < rows["ddim_nfe1"]["energy_distance"]
    assert rows["ddim_nfe1"]["off_mode_fraction"] > 0.9
    for name in ("panel.png", "eight_schools_auxiliary_rank.png", "estep_summary_ring8_emd.csv"):
        assert (tmp_path / name).stat().st_size > 0
    # the digits experiment, smoke-sized: measured rows, the grid
    digits = metrics["digits"]
    assert {"floor", "teacher_heun_nfe35", "diff_instruct", "emd"} <= set(digits)
    assert digits["floor"]["fid"] < digits["emd"]["fid"]
    assert (tmp_path / "digits" / "grid.png").stat().st_size > 0
