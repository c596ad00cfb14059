"""`icl-scale launch`: `accelerate launch -m icl_scale ...` with icl-scale's exit codes.

    icl-scale launch --config_file launcher/cpu_2proc.yaml run --config launcher/default.yaml

Everything before the command (run, suite, sweep) is an `accelerate launch` option. accelerate
turns any failing rank into exit 1 and a page of torch.distributed tracebacks; here the ranks
have already said why in one line each, so the launcher adds nothing and exits as they did: 2 for
bad input, 130 when interrupted, 128 + N when a signal N stopped the launch (its ranks are taken
down with it, and a rerun of the same command resumes).
"""

from __future__ import annotations

import logging
import signal
import subprocess

from icl_scale.errors import say

COMMANDS = ("run", "suite", "sweep")


def exit_code(codes: list[int]) -> int:
    """One exit code for the ranks' codes: bad input (2) first, then an interrupt, then the first
    other failure; a rank killed by signal N (negative code) counts as 128 + N."""
    codes = [128 - c if c < 0 else c for c in codes if c != 0]
    for wanted in (2, 130):
        if wanted in codes:
            return wanted
    return codes[0] if codes else 1


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    at = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if at is None and {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\nThe accelerate options: `accelerate launch --help`.")
        return 0
    if at is None:
        say(f"icl-scale: error: launch: no command after the accelerate options (one of {', '.join(COMMANDS)})")
        return 2
    args = launch_command_parser().parse_args([*argv[:at], "-m", "icl_scale", *argv[at:]])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # the ranks said why
    try:
        launch_command(args)
    except ChildFailedError as e:
        return exit_code([f.exitcode for f in e.failures.values()])
    except subprocess.CalledProcessError as e:   # one process: accelerate's simple launcher
        return exit_code([e.returncode])
    except SignalException as e:   # the launcher was signalled; torch stopped the ranks
        name = signal.Signals(e.sigval).name
        say(f"icl-scale: stopped by {name}; rerun the same command to resume")
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        say("icl-scale: interrupted; rerun the same command to resume")
        return 130
    return 0
