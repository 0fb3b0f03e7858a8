"""rotorquant.Rotation through the public Python API: interop, dtypes, shapes, errors."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

import rotorquant as rq

KINDS = ["identity", "dense", "hadamard", "rotor3", "planar", "quat", "rotor_network"]


def test_rotation_kinds_lists_every_kind():
    assert rq.rotation_kinds() == KINDS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 96, 128, 130])
def test_apply_is_matrix_product_and_inverse_roundtrips(kind, dim):
    r = rq.Rotation(kind, dim, seed=3)
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((17, dim)).astype(np.float32)
    y = r.apply(x)
    assert y.shape == (17, r.padded_dim) and y.dtype == np.float32
    m = r.matrix()
    assert m.shape == (r.padded_dim, r.padded_dim)
    np.testing.assert_allclose(m @ m.T, np.eye(r.padded_dim), atol=1e-5)
    padded = np.zeros((17, r.padded_dim))
    padded[:, :dim] = x
    np.testing.assert_allclose(y, padded @ m.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(r.inverse(y), x, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS[1:])
def test_rotation_is_not_a_silent_no_op(kind):
    """Fails if a kind that promises a rotation leaves its input (or any block of it) unchanged."""
    r = rq.Rotation(kind, 64, seed=0)
    m = r.matrix()
    assert np.linalg.norm(m - np.eye(r.padded_dim)) > 1.0
    x = np.eye(64, dtype=np.float32)
    y = r.apply(x)[:, :64]
    moved = np.linalg.norm(y - x, axis=1)
    assert np.all(moved > 1e-3), "some basis vector is left unchanged"


@pytest.mark.parametrize("kind", KINDS)
def test_padded_dim_and_parameter_count(kind):
    dim = 130
    r = rq.Rotation(kind, dim, seed=1)
    expected_padded = {"identity": 130, "dense": 130, "hadamard": 256, "rotor3": 132, "planar": 130, "quat": 132,
                       "rotor_network": 135}[kind]  # 135 = 3^3 * 5: 130..134 have a prime factor > 7
    expected_params = {"identity": 0, "dense": 130 * 130, "hadamard": 256, "rotor3": 44 * 4, "planar": 65 * 2,
                       "quat": 33 * 8, "rotor_network": 135 + 3 * 3 + 5 * 5}[kind]
    assert r.padded_dim == expected_padded
    assert r.num_parameters == expected_params == r.parameters().size


def test_seed_determinism_and_difference():
    a, b, c = rq.Rotation("dense", 32, seed=5), rq.Rotation("dense", 32, seed=5), rq.Rotation("dense", 32, seed=6)
    np.testing.assert_array_equal(a.parameters(), b.parameters())
    assert not np.array_equal(a.parameters(), c.parameters())
    assert a == b and a != c and hash(a) == hash(b)


def test_determinism_across_processes():
    code = ("import rotorquant as rq, hashlib;"
            "print(hashlib.sha256(b''.join(rq.Rotation(k, 48, seed=11).parameters().tobytes() "
            "for k in rq.rotation_kinds())).hexdigest())")
    here = hashlib_digest()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == other


def hashlib_digest():
    import hashlib

    return hashlib.sha256(b"".join(rq.Rotation(k, 48, seed=11).parameters().tobytes()
                                   for k in rq.rotation_kinds())).hexdigest()


def test_batch_shapes_and_dtypes_numpy():
    r = rq.Rotation("hadamard", 100, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 100))
    for dtype in (np.float16, np.float32, np.float64):
        y = r.apply(x.astype(dtype))
        assert y.shape == (2, 3, 128) and y.dtype == dtype
    assert r.apply(x.astype(np.float32), dtype="float64").dtype == np.float64
    single = r.apply(x[0, 0])
    assert single.shape == (128,)
    empty = r.apply(np.zeros((0, 100), np.float32))
    assert empty.shape == (0, 128)


def test_non_contiguous_input_is_accepted_and_out_must_be_contiguous():
    r = rq.Rotation("rotor3", 64, seed=0)
    x = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32).T  # non-contiguous (10, 64)
    np.testing.assert_allclose(r.apply(x), r.apply(np.ascontiguousarray(x)))
    out = np.empty((10, r.padded_dim), np.float32)
    assert r.apply(x, out=out) is out
    np.testing.assert_allclose(out, r.apply(x))
    with pytest.raises(ValueError, match="C-contiguous"):
        r.apply(x, out=np.empty((r.padded_dim, 10), np.float32).T)
    with pytest.raises(TypeError, match="float32"):
        r.apply(x, out=np.empty((10, r.padded_dim), np.float64))
    with pytest.raises(ValueError, match=r"expected shape \(10, 66\)"):
        r.apply(x, out=np.empty((10, 65), np.float32))


def test_zero_copy_input_for_contiguous_float32(monkeypatch):
    from rotorquant import _interop

    x = np.ones((4, 16), np.float32)
    prepared = _interop.prepare(x, "x", last_dim=16)
    assert np.shares_memory(prepared.flat, x)


def test_bad_inputs_raise_clear_errors():
    r = rq.Rotation("quat", 16)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 16\), got \(3, 15\)"):
        r.apply(np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 16\)"):
        r.inverse(np.zeros((3, 15), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        r.apply(np.zeros((3, 16), np.int32))
    with pytest.raises(TypeError, match="dtype"):
        r.apply(np.zeros((3, 16), np.complex64))
    with pytest.raises(TypeError):
        r.apply("not an array")
    with pytest.raises(ValueError, match="kind"):
        rq.Rotation("householder", 16)
    with pytest.raises(TypeError, match="kind"):
        rq.Rotation(3, 16)
    with pytest.raises(ValueError, match="dim"):
        rq.Rotation("dense", 0)
    with pytest.raises(TypeError, match="dim"):
        rq.Rotation("dense", 16.0)
    with pytest.raises(ValueError, match="seed"):
        rq.Rotation("dense", 16, seed=-1)
    with pytest.raises(ValueError, match="dense"):
        rq.Rotation("dense", 20000)
    with pytest.raises(TypeError, match="dtype"):
        r.apply(np.zeros((3, 16), np.float32), dtype="int8")


def test_non_finite_values_propagate_without_crashing():
    r = rq.Rotation("hadamard", 8)
    x = np.zeros((2, 8), np.float32)
    x[0, 3] = np.nan
    x[1, 0] = np.inf
    y = r.apply(x)
    assert np.isnan(y[0]).all()  # hadamard mixes one NaN into every coordinate
    assert not np.isfinite(y[1]).all()


def test_pickle_roundtrip():
    r = rq.Rotation("planar", 10, seed=9)
    s = pickle.loads(pickle.dumps(r))
    assert s == r
    np.testing.assert_array_equal(s.parameters(), r.parameters())


def test_sequences_and_dlpack_inputs():
    r = rq.Rotation("planar", 4, seed=2)
    from_list = r.apply([[1.0, 2.0, 3.0, 4.0]])
    assert isinstance(from_list, np.ndarray)

    class Producer:  # any object with __dlpack__ (here backed by numpy)
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kwargs):
            return self.a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    a = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_allclose(r.apply(Producer(a)), from_list, rtol=1e-6)


def test_threads_give_identical_results():
    r = rq.Rotation("dense", 128, seed=0)
    x = np.random.default_rng(0).standard_normal((5000, 128)).astype(np.float32)
    before = rq.num_threads()
    try:
        rq.set_num_threads(1)
        one = r.apply(x)
        rq.set_num_threads(2)
        two = r.apply(x)
    finally:
        rq.set_num_threads(0)
    np.testing.assert_array_equal(one, two)
    assert rq.num_threads() == before


class TestTorch:
    torch = pytest.importorskip("torch")

    @pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32", "float64"])
    def test_torch_cpu_tensors_come_back_as_torch(self, dtype_name):
        torch = self.torch
        dtype = getattr(torch, dtype_name)
        r = rq.Rotation("rotor3", 64, seed=4)
        x = torch.randn(3, 5, 64).to(dtype)
        y = r.apply(x)
        assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == (3, 5, 66)
        reference = r.apply(x.to(torch.float32).numpy())
        tol = {"float16": 1e-2, "bfloat16": 5e-2}.get(dtype_name, 1e-5)
        np.testing.assert_allclose(y.to(torch.float32).numpy(), reference, atol=tol * 4, rtol=tol)
        back = r.inverse(y.to(torch.float32))
        np.testing.assert_allclose(back.numpy(), x.to(torch.float32).numpy(), atol=max(tol * 4, 1e-5))

    def test_requires_grad_and_non_contiguous(self):
        torch = self.torch
        r = rq.Rotation("dense", 16)
        x = torch.randn(16, 8, requires_grad=True).t()
        y = r.apply(x)
        assert not y.requires_grad
        np.testing.assert_allclose(y.numpy(), r.apply(x.detach().contiguous().numpy()), rtol=1e-6)

    def test_torch_out_and_errors(self):
        torch = self.torch
        r = rq.Rotation("hadamard", 16)
        x = torch.randn(4, 16)
        out = torch.empty(4, 16)
        assert r.apply(x, out=out) is out
        np.testing.assert_allclose(out.numpy(), r.apply(x.numpy()), rtol=1e-6)
        with pytest.raises(TypeError, match="torch.Tensor"):
            r.apply(x, out=np.empty((4, 16), np.float32))
        with pytest.raises(TypeError, match="dtype"):
            r.apply(torch.zeros(4, 16, dtype=torch.int64))
        with pytest.raises(ValueError, match="device"):
            r.apply(torch.zeros(4, 16, device="meta"))


# -- Hypothesis properties over kinds, dims and seeds -------------------------------------
from hypothesis import given, strategies as st  # noqa: E402


@given(kind=st.sampled_from(KINDS), dim=st.integers(1, 200), seed=st.integers(0, 2**64 - 1),
       rows=st.integers(0, 9), data_seed=st.integers(0, 2**32 - 1))
def test_property_orthogonal_inverse_and_norm(kind, dim, seed, rows, data_seed):
    r = rq.Rotation(kind, dim, seed=seed)
    m = r.matrix()
    np.testing.assert_allclose(m @ m.T, np.eye(r.padded_dim), atol=2e-6)
    x = np.random.default_rng(data_seed).standard_normal((rows, dim)).astype(np.float32)
    y = r.apply(x)
    assert y.shape == (rows, r.padded_dim)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=2e-5)
    np.testing.assert_allclose(r.inverse(y), x, atol=2e-5)
    # The inverse of any padded vector is M^T z restricted to the first dim coordinates.
    z = np.random.default_rng(data_seed + 1).standard_normal((rows, r.padded_dim)).astype(np.float32)
    np.testing.assert_allclose(r.inverse(z), (z @ m)[:, :dim], atol=2e-5)


@given(kind=st.sampled_from(KINDS[1:]), dim=st.integers(8, 160), seed=st.integers(0, 2**32))
def test_property_seeds_change_the_map(kind, dim, seed):
    a = rq.Rotation(kind, dim, seed=seed).parameters()
    b = rq.Rotation(kind, dim, seed=seed + 1).parameters()
    assert not np.array_equal(a, b)
