"""Command line: ``python -m sdekit demo [--seed N]`` and ``python -m sdekit study NAME | file.py``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdekit",
                                     description="sdekit: diffusion models as SDEs and ODEs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="a short tour: custom-SDE kernel vs quadrature, Fokker-Planck "
                                       "check, reverse-SDE and PF-ODE sampling of a Gaussian mixture")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    from .studies.cli import add_study_parser, main_study

    add_study_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "study":
        return main_study(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(seed=args.seed)
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
