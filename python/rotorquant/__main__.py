"""Command line: ``rotorquant`` / ``python -m rotorquant``.

Subcommands: ``info`` (build configuration), ``demo`` (the default job: rotate and quantize
random and outlier-heavy vectors with every rotation kind, print a table). ``--cmake-dir``
prints the folder to pass as rotorquant_DIR to CMake.
"""
from __future__ import annotations

import argparse
import sys


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotorquant", description=__doc__.splitlines()[0])
    parser.add_argument("--cmake-dir", action="store_true", help="print the CMake package folder and exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print version, build options, CUDA devices, cmake dir")
    demo = sub.add_parser("demo", help="rotate + Lloyd-Max quantize vectors with every rotation kind")
    demo.add_argument("--dim", type=int, default=128, help="vector dimension (default 128)")
    demo.add_argument("--bits", type=int, default=3, help="bits per coordinate, 1..8 (default 3)")
    demo.add_argument("--n", type=int, default=20000, help="number of vectors (default 20000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the rotations and data (default 0)")
    return parser


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.cmake_dir:
        from . import cmake_dir

        try:
            print(cmake_dir())
        except FileNotFoundError as error:
            print(f"rotorquant: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command in (None, "info"):
        from . import show_config

        show_config()
        return 0
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(dim=args.dim, bits=args.bits, n=args.n, seed=args.seed)
        except (ValueError, TypeError) as error:
            parser.exit(2, f"rotorquant demo: error: {error}\n")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
