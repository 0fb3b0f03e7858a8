"""Package surface: version, configuration, CMake folder, command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rotorquant as rq

ROOT = Path(__file__).resolve().parents[2]


def test_version_matches_single_source():
    text = (ROOT / "python" / "rotorquant" / "_version.py").read_text()
    assert f'__version__ = "{rq.__version__}"' in text
    assert rq._core.__version__ == rq.__version__


def test_config_and_has_cuda_are_consistent(capsys):
    info = rq.config()
    assert info["version"] == rq.__version__
    assert info["has_cuda"] == rq.has_cuda()
    if not rq._core.built_with_cuda:
        assert rq.has_cuda() is False and rq.cuda_device_count() == 0
    rq.show_config()
    assert "built_with_cuda" in capsys.readouterr().out


def test_cmake_dir_holds_config_and_headers():
    folder = Path(rq.cmake_dir())
    assert (folder / "rotorquantConfig.cmake").is_file()
    assert (folder / "rotorquantConfigVersion.cmake").is_file()
    package = Path(rq.__file__).parent
    for header in ("rotation.hpp", "codebook.hpp", "clifford.hpp", "random.hpp", "error.hpp"):
        assert (package / "include" / "rotorquant" / header).is_file(), header


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rotorquant", *args], capture_output=True, text=True, cwd="/")


def test_cli_cmake_dir_and_info():
    result = run_cli("--cmake-dir")
    assert result.returncode == 0 and result.stdout.strip() == rq.cmake_dir()
    info = run_cli("info")
    assert info.returncode == 0 and rq.__version__ in info.stdout


def test_cli_demo_runs_and_rejects_bad_arguments():
    result = run_cli("demo", "--n", "500", "--dim", "64")
    assert result.returncode == 0, result.stderr
    for kind in rq.rotation_kinds():
        assert kind in result.stdout
    bad = run_cli("demo", "--bits", "9")
    assert bad.returncode == 2 and "bits" in bad.stderr
    assert run_cli("frobnicate").returncode == 2
