"""The Clifford algebra Cl(3,0) on numpy arrays.

A multivector is the last axis of an array of shape ``(..., 8)`` holding the components
in the order ``[1, e1, e2, e3, e12, e13, e23, e123]`` (see :data:`basis`), with
``e1**2 == e2**2 == e3**2 == 1``. Every function is vectorized over the leading axes
with numpy broadcasting and computes in float64 through the C++ core.

A rotor ``R = exp(-angle/2 B) = cos(angle/2) - sin(angle/2) B`` (``B`` a unit bivector)
rotates a vector ``v`` by the sandwich ``R v R~``: with ``B = e12``, ``e1`` turns toward
``e2`` by ``+angle``.

Example::

    >>> import numpy as np, rotorquant.clifford as cl
    >>> R = cl.rotor([1.0, 0.0, 0.0], np.pi / 2)      # quarter turn in the e12 plane
    >>> np.round(cl.sandwich(R, cl.blade("e1")), 12)  # e1 -> e2
    array([0., 0., 1., 0., 0., 0., 0., 0.])
"""

from __future__ import annotations

import numpy as np

from . import _core

__all__ = [
    "basis",
    "blade",
    "geometric_product",
    "reverse",
    "grade",
    "norm",
    "rotor",
    "sandwich",
    "vector",
]

#: Names of the 8 basis blades, in component order.
basis = ("1", "e1", "e2", "e3", "e12", "e13", "e23", "e123")

_NUMERIC_KINDS = "biuf"


def _as_float64(value, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"{name}: expected a real numeric array, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _multivectors(value, name: str) -> np.ndarray:
    array = _as_float64(value, name)
    if array.ndim == 0 or array.shape[-1] != 8:
        raise ValueError(f"{name}: expected shape (..., 8), got {array.shape}")
    return array


def _rows(array: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(array.reshape(-1, width))


def blade(name: str) -> np.ndarray:
    """The unit basis blade called ``name`` (one of :data:`basis`) as an array of shape (8,)."""
    if name not in basis:
        raise ValueError(f"blade: expected one of {basis}, got {name!r}")
    out = np.zeros(8)
    out[basis.index(name)] = 1.0
    return out


def vector(xyz) -> np.ndarray:
    """The grade-1 multivectors ``x e1 + y e2 + z e3`` from an array of shape (..., 3); returns (..., 8)."""
    array = _as_float64(xyz, "vector: xyz")
    if array.ndim == 0 or array.shape[-1] != 3:
        raise ValueError(f"vector: xyz: expected shape (..., 3), got {array.shape}")
    out = np.zeros(array.shape[:-1] + (8,))
    out[..., 1:4] = array
    return out


def geometric_product(a, b) -> np.ndarray:
    """Geometric product ``a b`` of arrays of shape (..., 8), broadcast over the leading axes."""
    a = _multivectors(a, "geometric_product: a")
    b = _multivectors(b, "geometric_product: b")
    a, b = np.broadcast_arrays(a, b)
    shape = a.shape
    return _core.clifford_geometric_product(_rows(a, 8), _rows(b, 8)).reshape(shape)


def reverse(a) -> np.ndarray:
    """Reverse ``a~`` (grades 2 and 3 negated) of an array of shape (..., 8)."""
    a = _multivectors(a, "reverse: a")
    return _core.clifford_reverse(_rows(a, 8)).reshape(a.shape)


def grade(a, k: int) -> np.ndarray:
    """Grade-``k`` part (``k`` in 0..3) of an array of shape (..., 8); other components are zero."""
    a = _multivectors(a, "grade: a")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"grade: k: expected an integer, got {type(k).__name__}")
    if not 0 <= k <= 3:
        raise ValueError(f"grade: k: expected 0, 1, 2 or 3, got {k}")
    return _core.clifford_grade(_rows(a, 8), int(k)).reshape(a.shape)


def norm(a) -> np.ndarray:
    """Euclidean norm of the 8 components (= sqrt(<a a~>_0)); shape (...,) for input (..., 8)."""
    a = _multivectors(a, "norm: a")
    return _core.clifford_norm(_rows(a, 8)).reshape(a.shape[:-1])


def rotor(bivector, angle) -> np.ndarray:
    """Rotors ``exp(-angle/2 B) = cos(angle/2) - sin(angle/2) B`` as arrays of shape (..., 8).

    ``bivector`` has shape (..., 3) with components ``[b12, b13, b23]`` of a unit bivector
    (norm 1 within 1e-6, else ValueError); ``angle`` has shape (...) in radians. The two
    broadcast against each other. ``sandwich(rotor(B, t), v)`` rotates ``v`` by ``t`` in the
    plane of ``B`` (with ``B = e12``: from ``e1`` toward ``e2``).
    """
    bivector = _as_float64(bivector, "rotor: bivector")
    angle = _as_float64(angle, "rotor: angle")
    if bivector.ndim == 0 or bivector.shape[-1] != 3:
        raise ValueError(f"rotor: bivector: expected shape (..., 3), got {bivector.shape}")
    leading = np.broadcast_shapes(bivector.shape[:-1], angle.shape)
    bivector = np.broadcast_to(bivector, leading + (3,))
    angle = np.broadcast_to(angle, leading)
    out = _core.clifford_rotor(_rows(bivector, 3), np.ascontiguousarray(angle.reshape(-1)))
    return out.reshape(leading + (8,))


def sandwich(rotor, x) -> np.ndarray:
    """The sandwich product ``R x R~`` of arrays of shape (..., 8), broadcast over the leading axes.

    ``rotor`` may be any multivector (typically from :func:`rotor`); for a unit rotor and a
    grade-1 ``x`` the result is the rotated vector, grade 1 with the same norm.
    """
    rotor = _multivectors(rotor, "sandwich: rotor")
    x = _multivectors(x, "sandwich: x")
    rotor, x = np.broadcast_arrays(rotor, x)
    shape = x.shape
    return _core.clifford_sandwich(_rows(rotor, 8), _rows(x, 8)).reshape(shape)
