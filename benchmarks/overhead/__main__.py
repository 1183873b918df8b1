"""Command line of the overhead benchmark: ``python -m benchmarks.overhead`` (``--help``).

    python -m benchmarks.overhead              # ~9 minutes, writes results/overhead.md
    python -m benchmarks.overhead --small      # a ~1M GPT-2, one pair; writes nothing
    python -m benchmarks.overhead --long 1000  # ~32 minutes, results/overhead_long.md
    python -m benchmarks.overhead --size 1M --long 60 --out /tmp/long.md   # a check

The long run's two arms are this command again, with ``--worker-arm``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._common import RESULTS
from benchmarks.overhead import __doc__ as description
from benchmarks.overhead.long import ARMS, MODULE, long_worker, main_long
from benchmarks.overhead.short import SINGLE_MEASURES, main_short
from benchmarks.overhead.training import SIZES


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=description.split("\n\n")[0]
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="10M")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--pairs", type=int, default=2, help="(without, with) pairs of runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, constant schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed first run")
    parser.add_argument(
        "--measures",
        default="critical,trace,spectral,directional",
        help=f"measures timed alone, of {','.join(SINGLE_MEASURES)} ('' for none); "
        "preconditioned is a cold Lanczos (about as long as a cold spectral)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="quick check: --size 1M --pairs 1")
    parser.add_argument(
        "--long",
        type=int,
        default=None,
        metavar="STEPS",
        help="long run at the default schedule: both arms at once in two child processes",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default results/overhead.md (--long: results/overhead_long.md; --small: none)",
    )
    parser.add_argument("--worker-arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    if args.worker_arm:
        long_worker(args)
        return
    if args.long is not None:
        if args.long <= 0:
            parser.error("--long needs a positive number of steps")
        main_long(args, args.out or RESULTS / "overhead_long.md")
        return
    if args.small:
        args.size, args.pairs = "1M", 1
    measures = [m for m in args.measures.split(",") if m]
    unknown = set(measures) - set(SINGLE_MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}")
    main_short(args, measures, args.out or (None if args.small else RESULTS / "overhead.md"))


if __name__ == "__main__":
    main()
