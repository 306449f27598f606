"""The `megatron-sapo` console script.

Each subcommand lives in its own module and registers itself here. Megatron and transformers
are imported only once a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sapo.config import ConfigError
from megatron_sapo.parallel.spawn import RankError


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
    from megatron_sapo.analysis import compare
    from megatron_sapo.convert import commands, parity
    from megatron_sapo import train_command
    from megatron_sapo.plan import command as plan_command
    from megatron_sapo.rollout import server

    train_command.register(sub)
    plan_command.register(sub)
    commands.register(sub)
    parity.register(sub)
    server.register(sub)
    compare.register(sub)
    return parser


# Errors that describe bad input (a file, a field, a shape): reported in one line, exit 2.
USER_ERRORS = (ConfigError, FileExistsError, FileNotFoundError, KeyError, ValueError, RankError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"megatron-sapo {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
