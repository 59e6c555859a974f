"""The keras-aim command line."""

import subprocess
import sys

import pytest

from keras_aim import cli


def test_info_lists_every_preset(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, params in [
        ("aim_600m", "680,535,552"),
        ("aim_1b", "1,209,370,624"),
        ("aim_3b", "2,720,025,600"),
        ("aim_7b", "6,445,404,160"),
    ]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert params in line
    assert "84.0 / 82.4" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "keras_aim.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: keras-aim" in result.stdout
