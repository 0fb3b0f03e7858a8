"""PNG figures of ``rotorquant bench --plot DIR`` (matplotlib, the ``cli`` extra).

- ``mse_vs_bits.png``: MSE against bits per rotation (mse mode) on isotropic vectors and on the real keys, with
  the Lloyd-Max optimum and the paper's upper and lower bounds;
- ``attention_fidelity_per_layer.png``: attention KL per layer of the real KV sample per rotation;
- ``speed_vs_n.png``: encode throughput against batch size per rotation, with the numpy baseline.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List

from ._output import CliError, require_matplotlib

STYLE = {"identity": ":", "dense": "-", "hadamard": "-", "rotor3": "--", "planar": "--", "quat": "--"}


def prepare(folder: str):
    """pyplot, after checking that ``folder`` exists or can be created (a CliError otherwise)."""
    pyplot = require_matplotlib()
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CliError(f"--plot: {folder} exists and is not a folder", exit_code=2)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise CliError(f"--plot: cannot create folder {folder}: {error.strerror}", exit_code=2) from error
    return pyplot


def _save(figure, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def bench_figures(result: Dict[str, Any], folder: str) -> List[str]:
    pyplot = prepare(folder)
    paths = [mse_vs_bits(pyplot, result, folder), attention_per_layer(pyplot, result, folder)]
    if result["speed"]:
        paths.append(speed_vs_n(pyplot, result, folder))
    pyplot.close("all")
    return paths


def mse_vs_bits(pyplot, result: Dict[str, Any], folder: str) -> str:
    figure, axes = pyplot.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    panels = [(axes[0], result["synthetic"], "mse", f"isotropic Gaussian, d={result['settings']['dim']}"),
              (axes[1], result["real_kv"], "key_mse", "real SmolLM2 keys, d=64")]
    for axis, rows, key, title in panels:
        rows = [r for r in rows if r["mode"] == "mse"]
        bits = sorted({r["bits"] for r in rows})
        for rotation in dict.fromkeys(r["rotation"] for r in rows):
            points = sorted((r["bits"], r[key]) for r in rows if r["rotation"] == rotation)
            axis.plot([p[0] for p in points], [p[1] for p in points], STYLE.get(rotation, "-"), marker="o",
                      markersize=3, label=rotation)
        optimum = {}
        for r in rows:
            optimum.setdefault(r["bits"], r["mse_optimum"])
        axis.plot(bits, [optimum[b] for b in bits], color="black", linewidth=1, label="Lloyd-Max optimum")
        axis.plot(bits, [math.sqrt(3) * math.pi / 2 * 4.0 ** -b for b in bits], color="gray", linestyle="-.",
                  linewidth=1, label="paper bound √3π/2·4⁻ᵇ")
        axis.plot(bits, [4.0 ** -b for b in bits], color="gray", linestyle=":", linewidth=1, label="lower bound 4⁻ᵇ")
        axis.set_yscale("log")
        axis.set_xticks(bits)
        axis.set_xlabel("bits per coordinate")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative MSE  ‖x − x̂‖² / ‖x‖²")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    figure.suptitle("rotorquant bench: MSE vs bits (mse mode)", fontsize=11)
    path = _save(figure, folder, "mse_vs_bits.png")
    pyplot.close(figure)
    return path


def attention_per_layer(pyplot, result: Dict[str, Any], folder: str) -> str:
    focus = result["focus_bits"]
    entries = [e for e in result["per_layer"] if e["mode"] == "mse" and e["bits"] == focus]
    layers = sorted({e["layer"] for e in entries})
    rotations = list(dict.fromkeys(e["rotation"] for e in entries))
    figure, axis = pyplot.subplots(figsize=(6.5, 3.8))
    width = 0.8 / max(1, len(rotations))
    for i, rotation in enumerate(rotations):
        values = {e["layer"]: e["attention_kl"] for e in entries if e["rotation"] == rotation}
        axis.bar([j + (i - (len(rotations) - 1) / 2) * width for j in range(len(layers))],
                 [values[layer] for layer in layers], width=width, label=rotation)
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels([f"layer {layer}" for layer in layers])
    axis.set_yscale("log")
    axis.set_ylabel("attention KL(p ‖ p̂), nats")
    axis.set_title(f"Attention fidelity per layer, real SmolLM2 KV ({focus}-bit keys, mse)", fontsize=10)
    axis.legend(fontsize=7, ncol=2)
    axis.grid(True, axis="y", which="both", alpha=0.3)
    path = _save(figure, folder, "attention_fidelity_per_layer.png")
    pyplot.close(figure)
    return path


def speed_vs_n(pyplot, result: Dict[str, Any], folder: str) -> str:
    figure, axis = pyplot.subplots(figsize=(8.0, 3.8))
    rows = result["speed"]
    for device in dict.fromkeys(r["device"] for r in rows):
        for rotation in dict.fromkeys(r["rotation"] for r in rows if r["device"] == device):
            points = sorted((r["n"], r["encode_vectors_per_s"]) for r in rows
                            if r["device"] == device and r["rotation"] == rotation)
            baseline = rotation.startswith("numpy")
            axis.plot([p[0] for p in points], [p[1] for p in points],
                      "k-" if baseline else STYLE.get(rotation, "-"), marker="o", markersize=3,
                      label=f"{rotation} ({device})", linewidth=2 if baseline else 1)
    axis.set_xscale("log")
    axis.set_yscale("log")
    sizes = sorted({r["n"] for r in rows})
    axis.set_xticks(sizes)
    axis.set_xticklabels([str(n) for n in sizes])
    axis.minorticks_off()
    axis.set_xlabel("vectors per call (n)")
    axis.set_ylabel("encode throughput, vectors/s")
    s = result["settings"]
    axis.set_title(f"Encode speed, d={s['dim']}, {result['focus_bits']} bits, {result['machine']['cpu_count']} "
                   "CPU cores", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    axis.grid(True, which="both", alpha=0.3)
    path = _save(figure, folder, "speed_vs_n.png")
    pyplot.close(figure)
    return path
