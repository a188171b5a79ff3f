"""The console script: `emdppl samplers` lists the registry; bad commands fail with usage."""

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


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["sample-everything"])
    assert err.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
