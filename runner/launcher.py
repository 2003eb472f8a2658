"""`accelerate launch` with the scripts' conventions for the end of a launch, of one process or several.

    python -m runner.launcher --num_processes 8 parallel_dit.py --model DiT-XL/2 ...   # accelerate launch's flags

Ctrl-C (SIGINT), SIGTERM, SIGHUP or SIGQUIT stops every process; the main process keeps its finished samples and says where, and
the launch ends with exit code 130 (143) instead of the launcher's traceback. A process that fails has already
printed its one line; the launch exits with that process's code, again without the launcher's report. Both hold
for a launch of one process (accelerate's simple launcher) as for several (torchelastic's).
`accelerate launch` itself works the same way except for those two endings.
"""
import logging
import os
import signal
import subprocess
import sys

from runner.errors import STOP_SIGNALS


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


LAUNCHER = "runner.launcher"


def refuse(message):
    """A launcher flag that cannot be used: one line naming it, exit 2 (as the scripts' flags)."""
    print(f"{LAUNCHER}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None):
    from accelerate.commands import launch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    parser = launch.launch_command_parser()
    parser.error = refuse  # one line, not accelerate's 113 lines of usage before it
    args = parser.parse_args(argv)
    prog = os.path.basename(args.training_script)
    for flag in ("num_processes", "num_machines"):  # accelerate runs one process for 0 or -1: refused, not guessed
        value = getattr(args, flag)
        if value is not None and value < 1:
            refuse(f"--{flag} must be an integer >= 1, got {value}")
    if not (args.module or args.no_python) and not os.path.isfile(args.training_script):  # said by each process
        refuse(f"the script to launch is not a file: {args.training_script}")
    quiet_elastic_logs()
    # accelerate's one-process launcher ends a failed process with a CalledProcessError traceback and exit 1, and a
    # Ctrl-C with a KeyboardInterrupt traceback: ours ends both as a launch of several processes does
    # (launch_command looks the launcher up in its module when it runs)
    launch.simple_launcher = lambda launch_args: launch_one_process(launch_args, prog)
    try:
        launch.launch_command(args)
    except SignalException as e:
        print(f"{prog}: launch interrupted by {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        leave_failed(prog, [f.exitcode for f in e.failures.values() if f.exitcode])


def launch_one_process(args, prog):
    """accelerate's launch of one process (its simple_launcher: the same command and environment), ending as
    torchelastic's launch of several does. The process has a session of its own, so that a Ctrl-C (sent to the
    terminal's process group) reaches it once, passed on by the launcher: a second signal would cut short its
    keeping of the finished samples. The launch exits with the process's code."""
    from accelerate.utils import prepare_simple_launcher_cmd_env
    if (args.num_processes or 1) > 1:  # accelerate's choice, made without a word: the run shows it only in metrics
        print(f"{prog}: note: --num_processes {args.num_processes} starts one process here; accelerate launch "
              "starts several only with --multi_gpu and without --cpu (also on a CPU: README)", file=sys.stderr,
              flush=True)
    cmd, env = prepare_simple_launcher_cmd_env(args)
    process, early = [], []

    def pass_on(signum, frame):
        if process:
            process[0].send_signal(signum)
        else:  # it is being started: passed on once it is
            early.append(signum)
    for s in STOP_SIGNALS:  # SIGHUP too: the terminal closed reaches only this process, the leader of the session
        signal.signal(s, pass_on)
    process.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    for signum in early:
        process[0].send_signal(signum)
    code = process[0].wait()
    if code:
        leave_failed(prog, [code])


def leave_failed(prog, codes):
    """Exit after a launch whose processes ended with these (non-zero) codes. A process that failed has printed its
    one line: the launch exits with its code. One killed by a signal (negative: e.g. SIGKILL, out of memory)
    printed nothing: say so here, and exit with 128 + the signal."""
    failed = [c for c in codes if c > 0]
    if failed:  # the others were stopped because of it (SIGTERM from the launcher): its code, its line said
        sys.exit(failed[0])
    if any(c < 0 for c in codes):
        sig = -next(c for c in codes if c < 0)
        print(f"{prog}: a process was killed by {signal.Signals(sig).name}", file=sys.stderr, flush=True)
        sys.exit(128 + sig)
    sys.exit(1)


if __name__ == "__main__":
    main()
