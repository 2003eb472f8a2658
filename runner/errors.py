"""How a run ends: the error types with their exit codes, and the handler that turns them and signals into one line.

    UsageError              a bad flag value                          exit 2
    InputFileError          a missing or unusable file or folder     exit 1
    NonFiniteModelOutput    the model returned NaN or inf            exit 1
    SIGINT / SIGTERM        the run stops, finished samples kept     exit 130

A run writer (writer.py) that an exception passes through marks its folder and appends (folder, finished samples)
to the exception's `kept` list, so the one line can say where the finished samples are.
"""
import os
import signal
import sys

from paratAA import NonFiniteModelOutput

EXIT_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A bad flag value: one line, exit code 2."""


class InputFileError(Exception):
    """A missing or unusable file or folder: one line, exit code 1."""


def _terminate(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _kept(e, sep):
    return sep.join(f"{n} finished samples kept in {d}" for d, n in getattr(e, "kept", []))


def exit_on_error(main, args):
    """Run main(args); turn the expected errors into one line on stderr and an exit code (no traceback).

    SIGINT and SIGTERM stop the run: run folders keep every finished sample and metrics.json says which
    (status "interrupted"), and the process exits with 130."""
    prog = os.path.basename(sys.argv[0])
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when a non-interactive shell started us with SIGINT ignored
    try:
        return main(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except InputFileError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except NonFiniteModelOutput as e:
        where = _kept(e, "; ")
        print(f"{prog}: error: {e}" + (f"; {where}" if where else ""), file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted ({_kept(e, '; ') or 'nothing written'})", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
