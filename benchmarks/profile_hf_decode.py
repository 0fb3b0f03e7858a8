"""Where a Hugging Face decode step spends its host time and how many kernels it launches: DynamicCache (sdpa, the
baseline, same run) vs RotorQuantCache, on the synthetic Llama of bench_hf_decode.py, under torch.profiler.

    python benchmarks/profile_hf_decode.py [--context 4096] [--batch 1] [--steps 8] [--configs dynamic,K4V3-nochk]

Per config: GPU kernels per decode step (profiler device events / steps) and per layer in excess of DynamicCache,
host launch calls per step (cudaLaunchKernel and friends), wall ms per step without the profiler (median of 3
windows, CUDA events) and under it, then the ops with the most host (self CPU) time per step; with --cprofile, the
Python functions with the most own time per step (cProfile, no torch profiler).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_hf_decode as bench  # noqa: E402
import rotorquant.hf as rqhf  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
            "cudaMemsetAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def make_cache(model, name, args):
    if name == "dynamic":
        model.set_attn_implementation("sdpa")
        return transformers.DynamicCache()
    bits, _, suffix = name.partition("-")
    model.set_attn_implementation(rqhf.ATTENTION_NAME)
    return rqhf.RotorQuantCache(model.config, key_bits=int(bits[1:bits.index("V")]),
                                value_bits=int(bits[bits.index("V") + 1:]), residual_window=args.residual_window,
                                sink_tokens=args.sink_tokens, device_checks=suffix != "nochk")


def step(model, cache, token):
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(dim=-1)


def timed_steps(model, cache, token, steps):
    """(last token, ms per step) of `steps` greedy decode steps timed with CUDA events."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        token = step(model, cache, token)
    end.record()
    torch.cuda.synchronize()
    return token, begin.elapsed_time(end) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="profiled decode steps")
    parser.add_argument("--configs", default="dynamic,K4V3,K4V3-nochk")
    parser.add_argument("--top", type=int, default=14, help="ops listed per config")
    parser.add_argument("--residual-window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--cprofile", type=int, default=0, help="Python functions listed per config (0: none)")
    cli = parser.parse_args()
    # the model of bench_hf_decode.py with its defaults
    args = argparse.Namespace(vocab=32000, hidden=2048, intermediate=0, layers=4, heads=32, kv_heads=8, head_dim=128,
                              contexts=[cli.context], decode=4 * cli.steps + 64, warmup=8, repeats=1, dtype="bfloat16")
    model = bench.build_model(args)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.layers} layers, context {cli.context}, batch {cli.batch}, {cli.steps} profiled steps")
    rows, tables = [], []
    for name in cli.configs.split(","):
        cache = make_cache(model, name, cli)
        ids = torch.randint(3, args.vocab, (cli.batch, cli.context), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad(), bench.sdpa_backends(["flash", "efficient", "math"]):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(dim=-1)
            del out
            for _ in range(8):
                token = step(model, cache, token)
            windows = []
            for _ in range(3):
                token, ms = timed_steps(model, cache, token, cli.steps)
                windows.append(ms)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                token, profiled_ms = timed_steps(model, cache, token, cli.steps)
            python_lines = []
            if cli.cprofile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(cli.steps):
                    token = step(model, cache, token)
                torch.cuda.synchronize()
                profiler.disable()
                text = io.StringIO()
                stats = pstats.Stats(profiler, stream=text)
                stats.sort_stats("tottime").print_stats(cli.cprofile)
                python_lines = [f"  (cProfile totals over {cli.steps} steps)"] + [
                    line for line in text.getvalue().splitlines() if line.strip()][-cli.cprofile - 1:]
        events = prof.events()
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = {k: 0 for k in LAUNCHES}
        for e in events:
            if e.name in launches:
                launches[e.name] += 1
        rows.append((name, sorted(windows)[1], profiled_ms, kernels / cli.steps,
                     {k: v / cli.steps for k, v in launches.items() if v}))
        averages = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
        lines = [f"{a.key[:60]:<60} {a.self_cpu_time_total / cli.steps / 1e3:>8.3f} ms {a.count / cli.steps:>6.1f}"
                 for a in averages[:cli.top]]
        tables.append((name, lines + python_lines))
        del cache
        torch.cuda.empty_cache()

    for name, lines in tables:
        print(f"\n{name}: ops by host (self CPU) time per step          host ms/step  calls/step")
        print("\n".join(lines))
    base = next((r for r in rows if r[0] == "dynamic"), None)
    print(f"\n{'cache':<14} {'ms/step':>8} {'(profiled)':>10} {'kernels/step':>12} {'extra/layer':>11}  host calls per step")
    for name, ms, profiled, kernels, launches in rows:
        extra = f"{(kernels - base[3]) / args.layers:>11.1f}" if base else f"{'-':>11}"
        calls = ", ".join(f"{k} {v:.0f}" for k, v in launches.items())
        print(f"{name:<14} {ms:>8.2f} {profiled:>10.2f} {kernels:>12.1f} {extra}  {calls}")
    print("ms/step: CUDA events, median of 3 windows without the profiler; extra/layer: kernels per step and layer "
          "beyond DynamicCache's.")


if __name__ == "__main__":
    main()
