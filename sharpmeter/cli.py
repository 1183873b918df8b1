"""The ``sharpmeter`` command: one subcommand per part of the library.

Each part registers its own subcommands (``register(subparsers)``), so this file only wires them up.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sharpmeter.harness import commands
from sharpmeter.paper.analysis import cli as analysis_cli
from sharpmeter.paper.simulator import cli as simulator_cli

_PARTS = (simulator_cli, analysis_cli, commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharpmeter",
        description="Loss-landscape sharpness: simulate, fit, study, compare, report.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for part in _PARTS:
        part.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
