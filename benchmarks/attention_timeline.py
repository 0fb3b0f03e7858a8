"""Where the time of one fused decode-attention call goes: the launches' own durations and the gaps between them, from
the CUDA activity trace (torch.profiler / CUPTI), at real clocks and with programmatic dependent launch in effect.

    python benchmarks/attention_timeline.py [--shapes 1x4096 1x131072 32x32768] [--bits 3/3] [--calls 40]

Shapes and codes as benchmarks/bench_attention.py (Hq = 32, Hkv = 8, d = 128, hadamard, fp16 norms, bf16 queries,
random codes, no full-precision window). For each shape, eager calls (through Python) and the same calls captured in
a CUDA graph; per call (mean over the calls after the first): each kernel's duration (prepare: 0 where the split
kernel rotates the queries itself), the starts of split and combine after the previous kernel's start, the end of the
call after the end of the split kernel, the span from the first kernel's
start to the last one's end, and the period (start to start of consecutive calls). ncu (DURATIONS=1 in
gpu_attention.sh) serializes kernels and locks clocks; this trace does neither.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

import rotorquant as rq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import DIM, KV_HEADS, Q_HEADS, FusedCase, quantizers  # noqa: E402

KERNELS = ("prepare", "split", "combine")


def kernel_role(name: str) -> str | None:
    for role in KERNELS:
        if role in name:
            return role
    return None


def trace_calls(fn, calls: int):
    """Kernel events (role, start us, end us) of `calls` calls of fn, in order of start."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = []
    for e in events:
        if e.get("cat") != "kernel":
            continue
        role = kernel_role(e["name"])
        if role is not None:
            kernels.append((role, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    kernels.sort(key=lambda k: k[1])
    return kernels


def summarize(kernels):
    """Per-call means: durations, start offsets, tail after the split kernel, span, period. A call is the launches
    from one first kernel (prepare, or split where the split kernel rotates the queries itself) to the next; kernels
    a call does not launch read as 0 (prepare) or are left out of the offsets."""
    if not kernels:
        return None
    first = kernels[0][0]
    calls, current = [], []
    for k in kernels:
        if k[0] == first and current:
            calls.append(current)
            current = []
        current.append(k)
    calls.append(current)
    calls = [{role: (start, end) for role, start, end in c} for c in calls if {"split", "combine"} <= {k[0] for k in c}]
    if len(calls) < 3:
        return None
    calls = calls[1:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {f"{r} us": mean([c[r][1] - c[r][0] if r in c else 0.0 for c in calls]) for r in KERNELS}
    out["split start-prep start"] = mean([c["split"][0] - c["prepare"][0] if "prepare" in c else 0.0 for c in calls])
    out["comb start-split start"] = mean([c["combine"][0] - c["split"][0] for c in calls])
    out["end-split end"] = mean([c["combine"][1] - c["split"][1] for c in calls])
    out["span us"] = mean([c["combine"][1] - min(v[0] for v in c.values()) for c in calls])
    starts = [min(v[0] for v in c.values()) for c in calls]
    out["period us"] = mean([b - a for a, b in zip(starts, starts[1:])])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x4096", "1x32768", "1x131072", "32x32768"],
                        help="BxCONTEXT")
    parser.add_argument("--bits", nargs="+", default=["3/3"], metavar="K/V")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and rq.has_cuda()):
        print("attention_timeline: needs a CUDA device and a CUDA build of rotorquant", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_properties(device).name}; Hq={Q_HEADS} Hkv={KV_HEADS} d={DIM}; "
          f"means over {args.calls - 1} calls (us)")
    header = None
    for shape in args.shapes:
        batch, context = (int(x) for x in shape.split("x"))
        for pair in args.bits:
            key_bits, value_bits = (int(x) for x in pair.split("/"))
            case = FusedCase(batch, context, quantizers(key_bits, 0), quantizers(value_bits, 1), Q_HEADS, device)
            fused = case.call
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                fused()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(args.calls):
                    fused()
            for mode, fn, calls in (("eager", fused, args.calls), ("graph", graph.replay, 1)):
                s = summarize(trace_calls(fn, calls))
                if s is None:
                    print(f"{batch:>3} {context:>7} {pair} {mode}: kernels not found in the trace")
                    continue
                if header is None:
                    header = f"{'B':>3} {'context':>7} {'K/V':>4} {'mode':>5} " + " ".join(f"{k:>22}" for k in s)
                    print(header)
                    print("-" * len(header))
                print(f"{batch:>3} {context:>7} {pair:>4} {mode:>5} " + " ".join(f"{v:>22.2f}" for v in s.values()),
                      flush=True)
            del graph, case, fused
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
