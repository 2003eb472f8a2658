"""How a run ends: the error types with their exit codes, and the handler that turns them and signals into one line.

    UsageError              a bad flag value                             exit 2
    InputFileError          a missing or unusable file or folder        exit 1
    NonFiniteModelOutput    the model returned NaN or inf               exit 1
    FloatingPointError      the solver's states became NaN or inf       exit 1
    OutputError             an output file could not be written (a full disk)   exit 1
    anything else           one line naming it (PARATAA_DEBUG=1: the traceback too)   exit 1
    SIGINT / SIGTERM / SIGHUP / SIGQUIT   the run stops, finished samples kept   exit 128 + the signal (130, 143,
                            129, 131)

A run writer (writer.py) that an exception passes through marks its folder and appends (folder, finished samples)
to the exception's `kept` list, so that the one line can say where the finished samples are.

This module imports nothing heavy, so that a script can install the signal handlers before it imports torch.
"""
import contextlib
import os
import signal
import sys
import threading

from runner.environment import process_rank

EXIT_FAILED, EXIT_USAGE = 1, 2
# the signals that stop a run, keeping its finished samples: Ctrl-C, kill, the terminal closed (an ssh session
# dropped), Ctrl-\. The last two killed the run by default, leaving its folder "running" with no grid
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                     if hasattr(signal, name))


class UsageError(Exception):
    """A bad flag value: one line, exit code 2."""


class InputFileError(Exception):
    """A missing or unusable file or folder: one line, exit code 1."""


class OutputError(Exception):
    """An output file that could not be written (a full disk, a folder made read-only meanwhile): one line naming
    it, exit code 1."""


def cannot_write(path, error):
    """The OutputError for an OSError met while writing path."""
    return OutputError(f"cannot write {path} ({error.strerror or error})")


def add_kept(exc, folder, finished):
    """Say, on the exception passing through, that `finished` samples are complete in `folder`."""
    try:
        exc.kept = getattr(exc, "kept", []) + [(folder, finished)]
    except AttributeError:  # an exception type that takes no attributes: the folder is marked all the same
        pass


@contextlib.contextmanager
def signals_held():
    """The STOP_SIGNALS ignored while a run writes its last files: a second Ctrl-C there ended the run with
    metrics.json still "running" and a line saying nothing was written. Main thread only (where handlers live)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in previous:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: installed from C, cannot be put back from Python
                signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """One of the STOP_SIGNALS arrived; exit code 128 + the signal number."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _prog():
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "paratAA"


def exit_quietly_on_signals():
    """Until exit_on_error takes over: a signal (e.g. Ctrl-C while torch is still importing) prints one line and
    exits with 128 + the signal number. Nothing has been written yet, so there is nothing to keep."""
    def leave(signum, frame):
        print(f"{_prog()}: interrupted (nothing written)", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    for s in STOP_SIGNALS:
        signal.signal(s, leave)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def debugging():
    """PARATAA_DEBUG set to anything but empty, 0, false, no or off: an unexpected error raises with its traceback
    (PARATAA_DEBUG=0 turned it on, as any value did)."""
    return os.environ.get("PARATAA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _kept(e):
    return "; ".join(f"{n} finished samples kept in {d}" for d, n in getattr(e, "kept", []))


# What a collective raises when a peer process has gone (gloo's TCP transport; NCCL's): the process that failed
# says why in its own line, and the transport's text (a C++ source path, "GLHF!") would only hide it.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "remote process exited")
# ... and when a peer is alive but did not answer within the process group's timeout (the scripts' --dist_timeout):
# gloo's "[.../unbound_buffer.cc:129] Timed out waiting 5000ms for recv operation to complete", the store's "wait
# timeout after 2000ms"
_PEER_SLOW = ("timed out waiting", "wait timeout after")


def rank():
    """This process's rank in a launch (runner.environment): the one test of which process speaks, for errors here and
    notes (flags.note)."""
    return process_rank()


def one_line(text):
    """text with its line breaks written as \\n and \\r: a path may hold one (--model_path $'a\\nb.pt'), and the
    one line naming it became two."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _fail(message, code, every_rank=False):
    """One line and exit. Flags and files are checked alike by every process of a launch: the first one says it.
    An error of one process (out of memory on its GPU) is said by that process, naming itself."""
    message = one_line(message)
    if rank() == 0:
        print(f"{_prog()}: error: {message}", file=sys.stderr, flush=True)
    elif every_rank:
        print(f"{_prog()}: error (process {rank()}): {message}", file=sys.stderr, flush=True)
    _leave(code)


def _process_group():
    """torch.distributed when this process is in a process group (a launch of several), else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _close_process_group():
    """The end of a run that succeeded on every process of a launch; nothing to do for a process on its own.

    Every process got here, so they meet once more and close the group while the interpreter is whole (as torch
    asks), then leave without the interpreter's and the C++ runtime's teardown: a thread of torch.distributed still
    running when the C++ destructors run aborts the process ("terminate called without an active exception", exit
    -6 after a complete run: 2-3 launches of 3 CPU processes in 20 on one machine, with the group already
    destroyed). Every file of the run is written and closed by now; only the terminal's buffers are left."""
    dist = _process_group()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
        _exit_now(0)


def _leave(code):
    """Exit after a failure or an interruption. Closing the group would wait for peers that may be stuck or gone,
    and Python's exit would tear it down with the abort above; by now the run writer has closed the run folder on
    the way out, so a process in a group leaves without that teardown."""
    if _process_group() is not None:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code):
    """Exit without the interpreter's and the C++ runtime's teardown, the terminal's buffers flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Terminal:
    """sys.stdout or sys.stderr for the length of a run: what the terminal is told is a courtesy, so a write that
    fails (the reader of a pipe has gone, e.g. `2>&1 | head -1`; a full disk) sends the rest to /dev/null instead
    of ending the run. The samples and metrics.json are written to the run folder all the same."""

    def __init__(self, stream):
        # None where the script was started with the descriptor closed (`>&-`): print() then failed on None's flush
        self._stream = open(os.devnull, "w") if stream is None else stream

    def _dead(self):
        try:  # later writes and the interpreter's own flush at exit then go nowhere, without another error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, AttributeError, ValueError):  # no file descriptor (a test's capture): drop the writes
            self._stream = open(os.devnull, "w")

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._dead()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._dead()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def exit_on_error(main, args):
    """Run main(args); turn every error into one line on stderr and an exit code (no traceback).

    The STOP_SIGNALS stop the run: run folders keep every finished sample and metrics.json says which
    (status "interrupted"), and the process exits with 128 + the signal number (130, 143, 129, 131). A process of a launch
    of several (a process group is up) that succeeded ends here with exit 0 (_close_process_group); one on its own
    returns main's result."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Terminal(sys.stdout), _Terminal(sys.stderr)
    try:
        return _run(main, args)
    finally:
        sys.stdout, sys.stderr = streams


def _run(main, args):
    for s in STOP_SIGNALS:  # SIGINT also when a non-interactive shell started us with it ignored
        signal.signal(s, _raise_interrupted)
    try:
        result = main(args)
        # the run is complete: a signal from here on ends the process by its default action, without a line that
        # would call the run interrupted, a traceback, or "Exception ignored" while the interpreter exits
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        _close_process_group()
        return result
    except UsageError as e:
        _fail(e, EXIT_USAGE)
    except InputFileError as e:
        _fail(e, EXIT_FAILED)
    except FloatingPointError as e:  # NonFiniteModelOutput, or the solver's states non-finite: said as they are
        _fail(f"{e}" + (f"; {_kept(e)}" if _kept(e) else ""), EXIT_FAILED)  # the gathered output: alike on all
    except OutputError as e:  # only the main process writes
        _fail(f"{e}" + (f"; {_kept(e)}" if _kept(e) else ""), EXIT_FAILED)
    except KeyboardInterrupt as e:
        if rank() == 0:  # the other processes of a launch write nothing and say nothing
            print(f"{_prog()}: interrupted ({one_line(_kept(e) or 'nothing written')})", file=sys.stderr,
                  flush=True)
        _leave(128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # not one of ours: still one line, the traceback only on request
        if debugging():
            raise
        text = (str(e).strip().splitlines() or [""])[0]
        if any(p in text.lower() for p in _PEER_GONE):
            text = ("lost the connection to another process of the run, which ended first (its own line, if any, "
                    f"says why; {type(e).__name__})")
        elif any(p in text.lower() for p in _PEER_SLOW):
            text = ("another process of the run did not answer within the process group's timeout (--dist_timeout, "
                    f"seconds): it is still working, or stopped without a word; {type(e).__name__}")
        elif isinstance(e, MemoryError) or "out of memory" in text.lower():
            text = (f"out of memory ({text or type(e).__name__}); lower --batch_size, --window_size or "
                    f"--memory_size, or use more processes")
        else:
            text = f"{type(e).__name__}: {text} (unexpected; run with PARATAA_DEBUG=1 for the traceback)"
        _fail(text + (f"; {_kept(e)}" if _kept(e) else ""), EXIT_FAILED, every_rank=True)
