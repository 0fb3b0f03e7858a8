"""``rotorquant demo``: the short table of every rotation kind on isotropic and outlier-heavy vectors
(what CI runs after installing). ``rotorquant bench --quick`` is the fuller quick look."""
from __future__ import annotations

from ._output import CliError


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="rotate + Lloyd-Max quantize vectors with every rotation kind (short)",
                            description="Rotate and Lloyd-Max quantize random and outlier-heavy vectors with every "
                                        "rotation kind and print one table.")
    parser.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    parser.add_argument("--bits", type=int, default=3, help="bits per coordinate, 1..8 (default 3)")
    parser.add_argument("--n", type=int, default=20000, help="number of vectors (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rotations and data (default 0)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .._demo import run_demo

    try:
        run_demo(dim=args.dim, bits=args.bits, n=args.n, seed=args.seed)
    except (ValueError, TypeError) as error:
        raise CliError(str(error), exit_code=2) from error
    return 0
