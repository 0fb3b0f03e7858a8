"""Property tests of rotorquant.clifford (Cl(3,0) on numpy arrays)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rotorquant.clifford as cl

SETTINGS = settings(deadline=None, max_examples=50)

finite = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_infinity=False)
multivectors = hnp.arrays(np.float64, (8,), elements=finite)
vectors3 = hnp.arrays(np.float64, (3,), elements=finite)
angles = st.floats(min_value=-2 * np.pi, max_value=2 * np.pi, allow_nan=False)


@st.composite
def unit_bivectors(draw):
    b = draw(hnp.arrays(np.float64, (3,), elements=st.floats(-1.0, 1.0)))
    length = np.linalg.norm(b)
    if length < 1e-3:
        b, length = np.array([1.0, 0.0, 0.0]), 1.0
    return b / length


@st.composite
def rotors(draw):
    return cl.rotor(draw(unit_bivectors()), draw(angles))


def _slow_product(a, b):
    """Independent oracle: the product from the blade bitmasks, written in Python."""
    masks = [0, 1, 2, 4, 3, 5, 6, 7]
    index = {m: i for i, m in enumerate(masks)}
    out = np.zeros(8)
    for i, j in itertools.product(range(8), range(8)):
        swaps = sum(bin((masks[i] >> s) & masks[j]).count("1") for s in range(1, 3))
        out[index[masks[i] ^ masks[j]]] += (-1) ** swaps * a[i] * b[j]
    return out


# ---- algebra -------------------------------------------------------------------


def test_basis_vectors_square_to_one_and_anticommute():
    one = cl.blade("1")
    for name in ("e1", "e2", "e3"):
        np.testing.assert_array_equal(cl.geometric_product(cl.blade(name), cl.blade(name)), one)
    for a, b in itertools.permutations(("e1", "e2", "e3"), 2):
        ab = cl.geometric_product(cl.blade(a), cl.blade(b))
        ba = cl.geometric_product(cl.blade(b), cl.blade(a))
        np.testing.assert_array_equal(ab, -ba)
    np.testing.assert_array_equal(cl.geometric_product(cl.blade("e1"), cl.blade("e2")), cl.blade("e12"))
    e123 = cl.geometric_product(cl.geometric_product(cl.blade("e1"), cl.blade("e2")), cl.blade("e3"))
    np.testing.assert_array_equal(e123, cl.blade("e123"))
    np.testing.assert_array_equal(cl.geometric_product(e123, e123), -one)


@SETTINGS
@given(multivectors, multivectors)
def test_product_matches_python_oracle(a, b):
    np.testing.assert_allclose(cl.geometric_product(a, b), _slow_product(a, b), rtol=1e-12, atol=1e-10)


@SETTINGS
@given(multivectors, multivectors, multivectors)
def test_associativity(a, b, c):
    left = cl.geometric_product(cl.geometric_product(a, b), c)
    right = cl.geometric_product(a, cl.geometric_product(b, c))
    np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-9)


@SETTINGS
@given(multivectors, multivectors)
def test_reverse_reverses_products(a, b):
    np.testing.assert_allclose(
        cl.reverse(cl.geometric_product(a, b)),
        cl.geometric_product(cl.reverse(b), cl.reverse(a)),
        rtol=1e-12,
        atol=1e-10,
    )
    np.testing.assert_array_equal(cl.reverse(a)[4:], -a[4:])
    np.testing.assert_array_equal(cl.reverse(a)[:4], a[:4])


@SETTINGS
@given(multivectors)
def test_grades_partition_and_norm(a):
    parts = [cl.grade(a, k) for k in range(4)]
    np.testing.assert_array_equal(sum(parts), a)
    np.testing.assert_array_equal(parts[1][[0, 4, 5, 6, 7]], 0.0)
    np.testing.assert_array_equal(parts[2][4:7], a[4:7])
    assert cl.norm(a) == pytest.approx(np.sqrt(np.sum(a * a)), rel=1e-14, abs=1e-300)
    assert cl.geometric_product(a, cl.reverse(a))[0] == pytest.approx(cl.norm(a) ** 2, rel=1e-12, abs=1e-12)


# ---- rotors ----------------------------------------------------------------------


@SETTINGS
@given(rotors())
def test_rotor_times_reverse_is_one(r):
    np.testing.assert_allclose(cl.geometric_product(r, cl.reverse(r)), cl.blade("1"), atol=1e-14)
    assert not cl.grade(r, 1).any()  # rotors are even
    assert r[7] == 0.0


@SETTINGS
@given(rotors(), vectors3)
def test_sandwich_keeps_vectors_and_norms(r, xyz):
    v = cl.vector(xyz)
    y = cl.sandwich(r, v)
    scale = 1.0 + np.linalg.norm(xyz)
    np.testing.assert_allclose(y[[0, 4, 5, 6, 7]], 0.0, atol=1e-14 * scale)
    assert cl.norm(y) == pytest.approx(np.linalg.norm(xyz), abs=1e-12 * scale)


@SETTINGS
@given(rotors(), rotors(), multivectors)
def test_composition_is_product_of_rotors(r1, r2, x):
    twice = cl.sandwich(r2, cl.sandwich(r1, x))
    once = cl.sandwich(cl.geometric_product(r2, r1), x)
    np.testing.assert_allclose(twice, once, atol=1e-11 * (1.0 + np.abs(x).max()))


def test_e12_rotor_turns_e1_toward_e2():
    angle = 0.7
    r = cl.rotor([1.0, 0.0, 0.0], angle)
    np.testing.assert_allclose(r, [np.cos(angle / 2), 0, 0, 0, -np.sin(angle / 2), 0, 0, 0], atol=1e-16)
    y = cl.sandwich(r, cl.blade("e1"))
    np.testing.assert_allclose(y, cl.vector([np.cos(angle), np.sin(angle), 0.0]), atol=1e-15)
    np.testing.assert_allclose(cl.sandwich(r, cl.blade("e3")), cl.blade("e3"), atol=1e-15)


# ---- broadcasting and shapes ---------------------------------------------------------


def test_broadcasting_matches_loops():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 1, 8))
    b = rng.normal(size=(3, 8))
    out = cl.geometric_product(a, b)
    assert out.shape == (4, 3, 8)
    for i, j in itertools.product(range(4), range(3)):
        np.testing.assert_allclose(out[i, j], _slow_product(a[i, 0], b[j]), rtol=1e-12, atol=1e-12)

    bivectors = rng.normal(size=(5, 3))
    bivectors /= np.linalg.norm(bivectors, axis=-1, keepdims=True)
    thetas = rng.uniform(-np.pi, np.pi, size=(2, 1))
    r = cl.rotor(bivectors, thetas)
    assert r.shape == (2, 5, 8)
    np.testing.assert_allclose(r[1, 3], cl.rotor(bivectors[3], thetas[1, 0]), atol=0)

    x = cl.vector(rng.normal(size=(2, 5, 3)))
    y = cl.sandwich(r, x)
    assert y.shape == (2, 5, 8)
    np.testing.assert_allclose(cl.norm(y), cl.norm(x), rtol=1e-12)
    assert cl.norm(x).shape == (2, 5)
    assert cl.reverse(x).shape == (2, 5, 8) and cl.grade(x, 1).shape == (2, 5, 8)

    # one rotor against many vectors, lists and ints accepted
    y_one = cl.sandwich(cl.rotor([0, 0, 1], np.pi / 2), cl.vector([[0, 1, 0], [0, 0, 1]]))
    np.testing.assert_allclose(y_one, cl.vector([[0, 0, 1], [0, -1, 0]]), atol=1e-15)


def test_empty_batches():
    assert cl.geometric_product(np.zeros((0, 8)), np.zeros((0, 8))).shape == (0, 8)
    assert cl.norm(np.zeros((0, 8))).shape == (0,)
    assert cl.rotor(np.zeros((0, 3)), np.zeros(0)).shape == (0, 8)


def test_non_contiguous_and_other_dtypes():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 16))[:, ::2]  # non-contiguous (6, 8)
    b = rng.normal(size=(6, 8)).astype(np.float32)
    out = cl.geometric_product(a, b)
    for i in range(6):
        np.testing.assert_allclose(out[i], _slow_product(a[i], b[i].astype(np.float64)), rtol=1e-12, atol=1e-12)
    assert out.dtype == np.float64


def test_basis_and_blade():
    assert cl.basis == ("1", "e1", "e2", "e3", "e12", "e13", "e23", "e123")
    for i, name in enumerate(cl.basis):
        np.testing.assert_array_equal(cl.blade(name), np.eye(8)[i])
    with pytest.raises(ValueError, match="e4"):
        cl.blade("e4")


# ---- errors ----------------------------------------------------------------------------


def test_wrong_last_axis_is_value_error():
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 8\), got \(2, 7\)"):
        cl.geometric_product(np.zeros((2, 7)), np.zeros((2, 8)))
    with pytest.raises(ValueError, match="8"):
        cl.reverse(np.zeros(3))
    with pytest.raises(ValueError):
        cl.norm(5.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        cl.vector(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        cl.rotor(np.zeros((2, 4)), 0.0)
    with pytest.raises(ValueError):
        cl.geometric_product(np.zeros((2, 8)), np.zeros((3, 8)))  # not broadcastable


def test_bad_bivector_and_grade_are_value_errors():
    with pytest.raises(ValueError, match="bivector norm"):
        cl.rotor([1.0, 1.0, 0.0], 0.3)
    with pytest.raises(ValueError):
        cl.rotor([0.0, 0.0, 0.0], 0.3)
    with pytest.raises(ValueError):
        cl.rotor([np.nan, 0.0, 0.0], 0.3)
    with pytest.raises(ValueError, match="angle"):
        cl.rotor([1.0, 0.0, 0.0], np.inf)
    with pytest.raises(ValueError, match="row 1"):
        cl.rotor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], 0.3)
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        cl.grade(np.zeros(8), 4)
    with pytest.raises(TypeError):
        cl.grade(np.zeros(8), 1.5)


def test_non_numeric_input_is_type_error():
    with pytest.raises(TypeError, match="numeric"):
        cl.geometric_product(np.array(["a"] * 8), np.zeros(8))
    with pytest.raises(TypeError):
        cl.norm([None] * 8)
    with pytest.raises(TypeError):
        cl.vector(np.zeros(3, dtype=complex))
    with pytest.raises(TypeError):
        cl.rotor([1.0, 0.0, 0.0], "0.5")


def test_core_validates_shapes():
    from rotorquant import _core

    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        _core.clifford_reverse(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="row count"):
        _core.clifford_sandwich(np.zeros((2, 8)), np.zeros((3, 8)))
    with pytest.raises(ValueError, match="angles"):
        _core.clifford_rotor(np.zeros((2, 3)), np.zeros(3))
