"""End-to-end decode through Hugging Face on a GPU: DynamicCache (sdpa) vs rotorquant.hf.RotorQuantCache.

A synthetic Llama-shaped model (random weights; sizes from the options: by default hidden 2048, 32 query heads,
8 KV heads, head_dim 128, 4 layers, bf16) prefills a prompt of random token ids (one forward pass), then decodes
greedily. Decode is timed with CUDA events after warm-up steps (--repeats windows, the median counts); tokens/s
counts batch x steps. Memory:
torch.cuda.max_memory_allocated during prefill and during decode (peak statistics reset in between) and the
cache's own bytes (DynamicCache: its key/value tensors; RotorQuantCache: KVCache.nbytes(), the device tensors).
The DynamicCache row of each context is the baseline the ratios divide by, measured in the same run.

    python benchmarks/bench_hf_decode.py [--contexts 4096,16384,32768] [--decode 64] [--layers 4] [--batch 1]

RotorQuantCache rows use attn_implementation="rotorquant": decode steps run KVCache.attend on the codes (the
fused kernel when rotorquant has DecodeAttention, else the dequantized path: the "path" column says which);
"nochk" rows pass device_checks=False (no host synchronization per append / attend).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch
import transformers

import rotorquant as rq
import rotorquant.hf as rqhf


def build_model(args):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(args.contexts) + args.decode * args.repeats + args.warmup + 16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype=getattr(torch, args.dtype)).eval()


def cache_bytes(cache) -> int:
    if isinstance(cache, rqhf.RotorQuantCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def sdpa_backends(names):
    """A context restricting torch's SDPA to the named backends (None: torch's own choice)."""
    if names is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel([table[n] for n in names])


def run(model, args, context, name, make_cache, backends):
    generator = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(3, args.vocab, (args.batch, context), generator=generator).cuda()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = make_cache()
    with torch.no_grad(), sdpa_backends(backends):
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(dim=-1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        prefill_peak = torch.cuda.max_memory_allocated() - base
        del out
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(dim=-1)
        window_ms, token = decode_window(model, cache, token, args.decode)
    path = "-"
    if isinstance(cache, rqhf.RotorQuantCache):
        path = cache.kv_cache.attend_path(1 if args.layers > 1 else 0, 1)
        assert cache.kv_cache.device_resident, "RotorQuantCache on a CUDA model must be device-resident"
    row = dict(context=context, name=name, path=path, prefill_s=prefill_s, windows=[window_ms],
               prefill_peak=prefill_peak, decode_peak=torch.cuda.max_memory_allocated() - base,
               cache_bytes=cache_bytes(cache))
    return row, (cache, token)


def decode_window(model, cache, token, steps):
    """(ms of `steps` greedy decode steps by CUDA events, the last token)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(dim=-1)
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end), token


def finish(row, args):
    """tokens/s and ms/step of a row from the median of its timed windows."""
    windows = sorted(row["windows"])
    decode_ms = windows[len(windows) // 2]
    row.update(tokens_per_s=args.batch * args.decode / (decode_ms / 1e3), ms_per_step=decode_ms / args.decode,
               spread=(windows[-1] - windows[0]) / decode_ms)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384, 32768])
    parser.add_argument("--decode", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed decode steps before timing")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed windows of --decode steps per row: the first right after the row's prefill and "
                             "warm-up, the others in rounds that alternate over the rows of the context (every cache "
                             "of a context stays alive meanwhile, so slow drifts of the machine hit all rows alike); "
                             "the median window counts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--residual-window", type=int, default=128)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--configs", default="dynamic,dynamic-anysdpa,K4V3,K3V3,K4V3-nochk",
                        help="comma list of dynamic, dynamic-anysdpa, KxVy, KxVy-nochk")
    parser.add_argument("--sdpa-backends", default="flash,efficient,math",
                        help="SDPA backends allowed in every row except *-anysdpa (torch's default choice); the "
                             "default leaves out cuDNN attention, which rebuilds its graph for every new key length "
                             "in decode")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and rq.has_cuda()):
        raise SystemExit("bench_hf_decode.py needs a CUDA GPU and rotorquant built with CUDA")

    model = build_model(args)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} query / {args.kv_heads} KV heads, head_dim "
          f"{args.head_dim}, {args.dtype}; batch {args.batch}; {args.warmup} warm-up + {args.repeats} x {args.decode} timed "
          f"decode steps (median window); "
          f"RotorQuantCache: residual_window {args.residual_window}, sink_tokens {args.sink_tokens}, hadamard, mse")
    rows = []
    restricted = args.sdpa_backends.split(",")
    print(f"SDPA backends: {restricted} (rows *-anysdpa: torch's default choice)")
    for context in args.contexts:
        live = []  # (row, attention implementation, SDPA backends, [cache, token]) of this context
        for name in args.configs.split(","):
            backends = None if name.endswith("-anysdpa") else restricted
            if name.startswith("dynamic"):
                attention = "sdpa"
                make_cache = transformers.DynamicCache
            else:
                bits, _, suffix = name.partition("-")
                key_bits, value_bits = int(bits[1:bits.index("V")]), int(bits[bits.index("V") + 1:])
                attention = rqhf.ATTENTION_NAME
                options = dict(key_bits=key_bits, value_bits=value_bits, residual_window=args.residual_window,
                               sink_tokens=args.sink_tokens, device_checks=suffix != "nochk")

                def make_cache(options=options):
                    return rqhf.RotorQuantCache(model.config, **options)
            model.set_attn_implementation(attention)
            try:
                row, state = run(model, args, context, name, make_cache, backends)
                rows.append(row)
                if args.repeats > 1:
                    live.append((row, attention, backends, list(state)))
                del state
            except torch.cuda.OutOfMemoryError as error:
                print(f"context {context} {name}: out of memory ({str(error).splitlines()[0]})")
            gc.collect()
            torch.cuda.empty_cache()
        for _ in range(args.repeats - 1):  # interleaved rounds over the live caches of this context
            for row, attention, backends, state in live:
                model.set_attn_implementation(attention)
                with torch.no_grad(), sdpa_backends(backends):
                    ms, state[1] = decode_window(model, state[0], state[1], args.decode)
                row["windows"].append(ms)
        del live
        gc.collect()
        torch.cuda.empty_cache()
        for row in rows:
            if row["context"] == context:
                finish(row, args)
                print(f"  done: context {context} {row['name']}: {row['tokens_per_s']:.1f} tok/s", flush=True)

    mib = 1024.0 ** 2
    header = (f"{'context':>8} {'cache':<16} {'path':<12} {'tok/s':>8} {'ms/step':>8} {'spread':>6} {'speed':>6} "
              f"{'prefill s':>9} {'prefill MiB':>11} {'decode MiB':>10} {'mem':>6} {'cache MiB':>9} {'cache':>6}")
    print()
    print(header)
    print("-" * len(header))
    for context in args.contexts:
        group = [r for r in rows if r["context"] == context]
        base = next((r for r in group if r["name"] == "dynamic"), None)
        for r in group:
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            mem = f"{r['decode_peak'] / base['decode_peak']:.2f}x" if base else "-"
            cache_ratio = f"{r['cache_bytes'] / base['cache_bytes']:.3f}" if base and base["cache_bytes"] else "-"
            print(f"{context:>8} {r['name']:<16} {r['path']:<12} {r['tokens_per_s']:>8.1f} {r['ms_per_step']:>8.2f} "
                  f"{100 * r['spread']:>5.0f}% {speed:>6} {r['prefill_s']:>9.2f} {r['prefill_peak'] / mib:>11.0f} "
                  f"{r['decode_peak'] / mib:>10.0f} {mem:>6} {r['cache_bytes'] / mib:>9.1f} {cache_ratio:>6}")
    print("speed = tok/s / DynamicCache's; spread = (slowest - fastest window) / median window; mem = decode peak "
          "(max_memory_allocated above the model, first decode window) / DynamicCache's; cache = cache bytes / "
          "DynamicCache's (the 'dynamic' row, SDPA restricted as above).")


if __name__ == "__main__":
    main()
