"""`accelerate launch` with the scripts' conventions for several processes.

    python -m runner.launcher --num_processes 8 parallel_dit.py --model DiT-XL/2 ...   # accelerate launch's flags

Ctrl-C (SIGINT) or SIGTERM stops every process; the main process keeps its finished samples and says where, and
the launch ends with exit code 130 (143) instead of the launcher's traceback. A process that fails has already
printed its one line; the launch exits with that process's code, again without the launcher's report.
`accelerate launch` itself works the same way except for those two endings.
"""
import logging
import os
import signal
import sys


def quiet_elastic_logs():
    """Silence torchelastic's own reports (this launcher prints one line instead).

    Some of its modules give their logger an explicit WARNING level when imported, so a level set on the parent
    "torch.distributed.elastic" does not reach them: e.g. the agent's "Received SIGTERM death signal" warning,
    printed or not depending on where the signal lands. Import what a launch uses, then set every such logger.
    """
    import torch.distributed.run  # noqa: F401  (imports the agent, the launcher API and their loggers)
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv=None):
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    args = launch_command_parser().parse_args(argv)
    quiet_elastic_logs()
    prog = os.path.basename(args.training_script)
    try:
        launch_command(args)
    except SignalException as e:
        print(f"{prog}: launch interrupted by {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode]
        code = next((c for c in codes if c > 0), 1)
        if any(c < 0 for c in codes) and code == 1:  # a process killed by a signal (e.g. SIGKILL, out of memory)
            sig = -next(c for c in codes if c < 0)
            print(f"{prog}: a process was killed by {signal.Signals(sig).name}", file=sys.stderr, flush=True)
            code = 128 + sig
        sys.exit(code)


if __name__ == "__main__":
    main()
