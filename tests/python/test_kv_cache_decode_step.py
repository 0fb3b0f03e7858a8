"""The decode step of the device-resident KVCache (docs/kv_cache.md, "Decode step"): one token per sequence and
layer, fed in the model's dtype.

- Results: after a prefill and many single-token steps (window ring wrapping, sinks, window 0, key scaling,
  centered values), in float16 / bfloat16 / float32 / float64, the device state holds the C++ cache's codes bit
  for bit (the C++ cache gets the same tokens converted to float32) and attends alike. CPU torch tensors (the
  same state machine with the CPU codec) and, marked cuda, the GPU.
- Structure: a steady-state decode append makes ONE codec call per kind for all heads and sequences, reading the
  token leaving the window in place (its window slot) and writing the codes in place (the code buffers), plus one
  torch op per kind for the new token's window slot; attend writes no lengths (views of a table).
"""
import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rotorquant as rq  # noqa: E402
import rotorquant._kv_cache_device as device_module  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from test_kv_cache_device import BACKENDS, D, assert_same_state, make_pair  # noqa: E402  (shared with that file)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CONFIGS = [
    dict(key_bits=4, value_bits=3, residual_window=5, sink_tokens=2),
    dict(key_bits=3, value_bits=3, residual_window=4, sink_tokens=0, center_values=True, key_channel_scaling=0.5),
    dict(key_bits=2, value_bits=4, rotation="planar", residual_window=0, sink_tokens=1),
    dict(key_bits=4, value_bits=4, rotation="dense", mode="prod", residual_window=3, norm_dtype="float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("config", CONFIGS, ids=["k4v3", "scaled-centered", "planar-window0", "dense-prod"])
def test_decode_steps_in_the_model_dtype_hold_the_cpu_caches_codes(backend, dtype, config):
    rng = np.random.default_rng(31)
    host, device = make_pair(backend, seed=4, **config)
    where = "cuda" if backend == "cuda" else "cpu"
    batch = 3
    for tokens in (11,) + (1,) * 17 + (3,) + (1,) * 4:
        k = torch.from_numpy(rng.standard_normal((batch, 2, tokens, D))).to(dtype)
        v = torch.from_numpy(rng.standard_normal((batch, 2, tokens, D)) + 0.5).to(dtype)
        k[..., 3] += 4.0
        for layer in range(2):
            host.append(layer, k.to(torch.float32).numpy(), v.to(torch.float32).numpy())
            device.append(layer, k.to(where), v.to(where))
    assert_same_state(host, device, backend)  # lengths, statistics, codes bit for bit, dequantized values
    q = rng.standard_normal((batch, 4, 1, D)).astype(np.float32)
    expected = host.attend(1, q)
    out = device.attend(1, torch.from_numpy(q).to(where))
    tolerance = 1e-3 if device.attend_path(1, 1) == "fused" else 1e-4
    assert np.abs(out.cpu().numpy() - expected).max() / max(1.0, np.abs(expected).max()) <= tolerance


# ---- the structure of a decode step (CPU torch tensors, a recording codec) -----------------------------------------


class RecordingCodecGroup:
    """Stands for _core.CudaQuantizerGroup: records the calls (pointers, strides) and writes nothing."""

    def __init__(self, kind, log):
        self.kind, self.log = kind, log

    def encode(self, x_ptr, n, groups, x_head_stride, x_group_stride, indices_ptr, norms_ptr, signs_ptr,
               residual_norms_ptr, code_head_stride, code_group_stride, stream, check):
        self.log.append(dict(kind=self.kind, x_ptr=x_ptr, n=n, groups=groups, x_strides=(x_head_stride, x_group_stride),
                             indices_ptr=indices_ptr, norms_ptr=norms_ptr,
                             code_strides=(code_head_stride, code_group_stride), check=check))

    def decode(self, *args):
        raise AssertionError("a decode step decodes nothing")


class StubAttention:
    """Stands for DecodeAttention: records the lengths it got, returns an uninitialized output (no op)."""

    lengths = []

    def __init__(self, key_quantizers, value_quantizers, device=None):
        pass

    @staticmethod
    def unsupported_reason(key_params, value_params):
        return None

    def __call__(self, queries, key_indices, key_norms, value_indices, value_norms, code_lengths, **options):
        type(self).lengths.append((code_lengths, options.get("fp_lengths")))
        return torch.empty(queries.shape, dtype=queries.dtype)


class CountOps(TorchDispatchMode):
    """Counts the torch ops that compute or write data (views and metadata ops are free: no kernel on a GPU)."""

    FREE = {"aten.slice.Tensor", "aten.select.int", "aten.view.default", "aten.detach.default", "aten.alias.default",
            "aten.permute.default", "aten.unsqueeze.default", "aten.transpose.int", "aten.expand.default",
            "aten.empty.memory_format", "aten._unsafe_view.default"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name not in self.FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [1, 4])
def test_a_decode_step_is_one_codec_call_per_kind_and_two_window_writes(monkeypatch, batch):
    log = []
    monkeypatch.setattr(device_module, "_fused_attention_class", lambda device: (StubAttention, None))
    cache = rq.KVCache(1, 8, D, key_bits=4, value_bits=3, residual_window=6, sink_tokens=2,
                       device_checks=False)._use_torch_state_for_tests()
    state = cache._state
    rng = np.random.default_rng(2)
    prefill = torch.from_numpy(rng.standard_normal((batch, 8, 20, D)).astype(np.float32))
    cache.append(0, prefill, prefill)  # host codec (no recording yet): a real first chunk
    monkeypatch.setattr(device_module.DeviceKVState, "_codec_group",
                        lambda self, layer, kind: RecordingCodecGroup(kind, log))
    layer = state.layers[0]
    q = torch.zeros((batch, 16, 1, D), dtype=torch.bfloat16)
    cache.attend(0, q)  # the first attend makes the lengths table
    for step in range(9):  # the window ring wraps
        k = torch.from_numpy(rng.standard_normal((batch, 8, 1, D))).to(torch.bfloat16)
        oldest = 2 + layer.window_start  # the slot of the token leaving the window (sink_tokens = 2)
        c0 = layer.code_count
        log.clear()
        counter = CountOps()
        with counter:
            cache.append(0, k, k)
        assert [call["kind"] for call in log] == [0, 1]  # one call per kind, for all 8 heads and `batch` sequences
        for call, fp, codes in ((log[0], layer.fp_keys, layer.keys), (log[1], layer.fp_values, layer.values)):
            assert call["n"] == 1 and call["groups"] == batch and not call["check"]
            assert call["x_ptr"] == fp[:, :, oldest].data_ptr()  # read in place from its window slot
            assert call["x_strides"] == (fp.stride(1), fp.stride(0))
            capacity = layer.capacity
            assert call["indices_ptr"] == codes["indices"].data_ptr() + c0 * codes["indices"].shape[-1]
            assert call["norms_ptr"] == codes["norms"].data_ptr() + c0 * codes["norms"].shape[-1]
            assert call["code_strides"] == (batch * capacity, capacity)
        # the new token into the freed slot: keys centered (one subtraction), values copied (one copy)
        assert dict(counter.ops) == {"aten.sub.out": 1, "aten.copy_.default": 1}, dict(counter.ops)
        assert torch.equal(layer.fp_keys[:, :, oldest], k[:, :, 0].float() - layer.key_mean)
        assert torch.equal(layer.fp_values[:, :, oldest], k[:, :, 0].float())
        assert layer.code_count == c0 + 1
        StubAttention.lengths.clear()
        counter = CountOps()
        with counter:
            cache.attend(0, q)
        assert not counter.ops, dict(counter.ops)  # no length writes (nor anything else) around the kernel
        code_lengths, fp_lengths = StubAttention.lengths[0]
        assert code_lengths.dtype == torch.int32 and code_lengths.tolist() == [layer.code_count] * batch
        assert fp_lengths.tolist() == [2 + 6] * batch


@pytest.mark.cuda
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]], ids=["k4v3", "scaled-centered"])
def test_direct_fused_launch_equals_the_validated_call(monkeypatch, config):
    """After DecodeAttention.__call__ accepted a layer's buffers, decode steps launch its kernel directly: the same
    output bit for bit as the validated call, which runs again whenever a buffer changes (growth, reorder)."""
    from rotorquant._attention import DecodeAttention

    calls = []
    validated = DecodeAttention.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return validated(self, *args, **kwargs)

    monkeypatch.setattr(DecodeAttention, "__call__", counting)
    rng = np.random.default_rng(8)
    cache = rq.KVCache(1, 2, D, device="cuda", seed=2, **config)
    state = cache._state
    batch = 3
    k = torch.from_numpy(rng.standard_normal((batch, 2, 40, D)).astype(np.float32)).cuda()
    cache.append(0, k, k * 0.5)
    assert cache.attend_path(0, 1) == "fused"
    for step in range(6):
        k = torch.from_numpy(rng.standard_normal((batch, 2, 1, D)).astype(np.float32)).cuda().to(torch.bfloat16)
        cache.append(0, k, k)
        q = torch.from_numpy(rng.standard_normal((batch, 4, 1, D)).astype(np.float32)).cuda().to(torch.bfloat16)
        before = len(calls)
        direct = cache.attend(0, q)
        assert len(calls) == before + (1 if step == 0 else 0)  # validated once, then direct
        state.layers[0].fused_arguments = None  # force the validated call
        checked = cache.attend(0, q)
        assert len(calls) == before + (2 if step == 0 else 1)
        assert torch.equal(direct, checked)
    cache.reorder(torch.tensor([2, 0], device="cuda"))  # new buffers: validated again
    q = torch.zeros((2, 4, 1, D), device="cuda")
    before = len(calls)
    cache.attend(0, q)
    cache.attend(0, q)
    assert len(calls) == before + 1
