"""``rotorquant info``: version, build options, CUDA availability and devices, CMake folder."""
from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("info", help="version, build options, CUDA availability and device, cmake dir",
                            description="Print the version, build options, CUDA availability and devices, and "
                                        "the CMake package folder.")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the configuration as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .. import config
    from ._output import optional_module, write_json

    info = config()
    info["cli_extras"] = {name: optional_module(name) is not None for name in ("rich", "tqdm", "matplotlib")}
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    if args.json:
        write_json(args.json, {"command": "info", **info})
    return 0
