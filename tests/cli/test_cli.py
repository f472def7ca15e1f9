"""The `vitaserve` entry point dispatches to each area's CLI and explains what it cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitaserve import cli

pytestmark = [pytest.mark.unit]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_no_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: vitaserve" in capsys.readouterr().out


def test_unknown_subcommand_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_dispatches_to_the_subcommand_in_a_real_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "vitaserve.cli", "tiny-checkpoint", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout
