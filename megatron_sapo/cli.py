"""The `megatron-sapo` console script.

Each subcommand lives in its own module and registers itself here; heavy imports happen only
once a subcommand runs, so `megatron-sapo --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _selfcheck(args: argparse.Namespace) -> int:
    from megatron_sapo import selfcheck

    return selfcheck.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sapo",
        description="SAPO, GRPO, GSPO and routing-replay GRPO for MoE models on Megatron-Core with SGLang rollouts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "selfcheck",
        help="check the algorithm core on synthetic data (gates, gradients, gate-gap bound, vocab-parallel log-probs)",
    )
    check.set_defaults(func=_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
