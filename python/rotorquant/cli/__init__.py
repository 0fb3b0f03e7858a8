"""rotorquant: benchmark and evaluate TurboQuant-family quantizers (also python -m rotorquant).

Subcommands, one module each: ``bench`` (the seven tests of every rotation x mode x bits on isotropic data
and the shipped real KV sample), ``eval`` (real-model evaluation with SmolLM2 or a GGUF model), ``info``
(version, build, CUDA, CMake folder) and ``demo`` (the short table CI runs). Errors are one line
``rotorquant <command>: error: ...`` on stderr; bad arguments exit with 2, failures with 1.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._output import CliError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo, evaluate, info

    parser = OneLineErrorParser(prog="rotorquant", description=__doc__.splitlines()[0])
    parser.add_argument("--cmake-dir", action="store_true", help="print the CMake package folder and exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{bench,eval,info,demo}", parser_class=OneLineErrorParser)
    for module in (bench, evaluate, info, demo):
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(__version__)
        return 0
    if args.cmake_dir:
        from .. import cmake_dir

        try:
            print(cmake_dir())
        except FileNotFoundError as error:
            print(f"rotorquant: error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command is None:
        args = parser.parse_args(["info"])
    try:
        return int(args.run(args) or 0)
    except CliError as error:
        print(f"rotorquant {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"rotorquant {args.command}: interrupted", file=sys.stderr)
        return 130
