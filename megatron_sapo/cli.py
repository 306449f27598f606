"""The `megatron-sapo` console script.

Each subcommand lives in its own module and registers itself here. Megatron and transformers
are imported only once a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys

from megatron_sapo.errors import InputError
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
    from megatron_sapo.analysis import compare, diagnose
    from megatron_sapo.convert import commands, parity
    from megatron_sapo import eval_command, train_command
    from megatron_sapo.plan import command as plan_command
    from megatron_sapo.rollout import server

    train_command.register(sub)
    eval_command.register(sub)
    plan_command.register(sub)
    commands.register(sub)
    parity.register(sub)
    server.register(sub)
    compare.register(sub)
    diagnose.register(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a subcommand reports in one line, ``megatron-sapo COMMAND: error: MESSAGE``, with
    exit status 2: conditions the user must act on, whose message says what is wrong and where.
    Anything else, a plain ValueError or KeyError included, is a bug and keeps its traceback.

    The classes of modules the commands may not load (the rollout ones import aiohttp and
    requests) are imported here, when an error is being reported, not with the CLI."""
    from megatron_sapo.parallel.launch import LaunchError
    from megatron_sapo.parallel.megatron_cpu import CompatError
    from megatron_sapo.rollout.client import RolloutError
    from megatron_sapo.data.remote_reward import RewardServiceError
    from megatron_sapo.rollout.manager import ServerStartError
    from megatron_sapo.training.checkpoint import CheckpointError

    return (
        InputError,  # bad input the message names: a config value, a file's content, a tensor's name or shape
        FileExistsError,  # an output folder that exists (the message says to pass --force)
        FileNotFoundError,  # an input file or folder the message names is missing
        RankError,  # a spawned rank failed: its traceback is on stderr already, the message is its last line
        CheckpointError,  # a checkpoint is incomplete, unreadable or saved at another layout: pick another
        LaunchError,  # the launcher's variables are missing or contradict each other: fix the launch
        CompatError,  # the installed Megatron-Core is not the one the patches fit: install the pinned version
        ServerStartError,  # an SGLang server exited or never became healthy: the message names its log
        RolloutError,  # the servers failed every retry or serve another model: the message lists each failure
        RewardServiceError,  # data.reward_url failed every retry: the message names it and lists each failure
        # Not WeightSyncError: a server refusing an update mostly means the names, shapes or dtypes we
        # sent are wrong (a bug), and its message can be a bare underlying error; it keeps its traceback.
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"megatron-sapo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
