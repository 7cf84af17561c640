"""The tree follows the flake8 settings in setup.cfg (120 columns)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flake8_is_clean():
    pytest.importorskip("flake8")
    result = subprocess.run([sys.executable, "-m", "flake8", "src", "tests", "examples", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
