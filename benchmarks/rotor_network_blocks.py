"""How the fixed odd-radix blocks B_5 and B_7 of the rotor_network rotation were found.

A balanced block of radix r is an r x r orthogonal matrix whose entries all have magnitude
close to 1/sqrt(r). No real r x r orthogonal matrix with all |entries| = 1/sqrt(r) exists for odd
r > 1 (that would be a Hadamard matrix), so we minimize the worst ratio

    rho(B) = max( r * max_ij B_ij^2 ,  1 / (r * min_ij B_ij^2) )

over SO(r), parametrized as B = expm(A) with A skew-symmetric, by BFGS on a soft-max of
|log(r B_ij^2)| from random starts (scipy), then re-orthonormalize in float64 (polar factor) and
round to float32. B_3 = (2/3) J - I (rho = 3) needs no search: it is optimal for r = 3 (the search
below finds nothing better). The printed C++ table is what cpp/src/rotor_network.cpp contains; the
constants are frozen there (changing them changes every rotor_network rotation), so this script
documents their origin and is not run by the build.

    python benchmarks/rotor_network_blocks.py [--trials 40]
"""
from __future__ import annotations

import argparse

import numpy as np


def rotation_from_skew(params: np.ndarray, r: int) -> np.ndarray:
    from scipy.linalg import expm
    a = np.zeros((r, r))
    a[np.triu_indices(r, 1)] = params
    return expm(a - a.T)


def soft_worst_log_ratio(params: np.ndarray, r: int, sharpness: float) -> float:
    w = rotation_from_skew(params, r) ** 2 * r
    logs = np.abs(np.log(w + 1e-300))
    top = logs.max()
    return top + np.log(np.exp(sharpness * (logs - top)).sum()) / sharpness


def worst_ratio(b: np.ndarray) -> float:
    w = b ** 2 * b.shape[0]
    return float(max(w.max(), 1.0 / w.min()))


def search(r: int, trials: int, seed: int) -> np.ndarray:
    from scipy.linalg import polar
    from scipy.optimize import minimize
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(trials):
        x = rng.normal(size=r * (r - 1) // 2) * 2
        x = minimize(soft_worst_log_ratio, x, args=(r, 40.0), method="BFGS", options={"maxiter": 4000}).x
        value = worst_ratio(rotation_from_skew(x, r))
        if best is None or value < best[0]:
            best = (value, x)
    x = best[1]
    for sharpness in (100.0, 300.0, 1000.0):
        x = minimize(soft_worst_log_ratio, x, args=(r, sharpness), method="BFGS", options={"maxiter": 4000}).x
    return polar(rotation_from_skew(x, r))[0]


def cpp_table(name: str, b: np.ndarray) -> str:
    r = b.shape[0]
    rows = [",  ".join(f"{np.float32(v)!r:>15}f".replace("np.float32(", "").replace(")", "") for v in row)
            for row in b.astype(np.float32)]
    return f"const float {name}[{r * r}] = {{\n" + "".join(f"    {row},  //\n" for row in rows) + "};\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for r in (5, 7):
        b = search(r, args.trials, args.seed)
        print(f"// r = {r}: worst ratio rho = {worst_ratio(b):.4f}, r*min B^2 = {(b**2).min() * r:.4f}, "
              f"r*max B^2 = {(b**2).max() * r:.4f}")
        print(cpp_table(f"kRotorNetworkBlock{r}", b))


if __name__ == "__main__":
    main()
