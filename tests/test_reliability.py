"""Determinism across reruns, process counts and (simulated) nodes; signals, dead ranks and dead runs."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, only_run, read_latents as latents, read_metrics

SCRIPT = os.path.join(ROOT, "parallel_dit.py")
# a fixed window: "auto" chooses per machine and process count, and these runs are compared with each other
FLAGS = ["--timesteps", "20", "--window_size", "20", "--num_samples", "3", "--batch_size", "2", "--eta", "0.4",
         "--seed", "11"]


def launch(out, prefix=(), flags=FLAGS, env=None, wait=True):
    cmd = [sys.executable, *prefix, SCRIPT, *flags, "--output_path", str(out)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run(out)


def torchrun(n, port):
    return ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(port)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("single"))


def test_reruns_are_byte_identical(single, tmp_path):
    again = launch(tmp_path)
    with open(os.path.join(single, "latents.npz"), "rb") as a, open(os.path.join(again, "latents.npz"), "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("n", [2, 3])
def test_process_counts_agree(single, tmp_path, n):
    run_dir = launch(tmp_path, torchrun(n, free_port()))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        assert json.load(f)["world_size"] == n
    assert np.abs(latents(run_dir) - latents(single)).max() < 1e-5


def test_more_processes_than_window_inputs(tmp_path):
    flags = ["--timesteps", "6", "--window_size", "2", "--num_samples", "1", "--tol1", "0", "--tol2", "0"]
    one = launch(tmp_path / "one", flags=flags)
    three = launch(tmp_path / "three", torchrun(3, free_port()), flags=flags)
    assert np.abs(latents(one) - latents(three)).max() < 1e-5


def test_two_nodes_simulated_on_one_machine(single, tmp_path):
    port = free_port()
    nodes = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), SCRIPT, *FLAGS,
               "--output_path", str(tmp_path / f"node{rank}")]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    run_dir = only_run(tmp_path / "node0")  # only the global main process writes
    assert not (tmp_path / "node1").exists() or not os.listdir(tmp_path / "node1")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        assert json.load(f)["world_size"] == 2
    assert np.abs(latents(run_dir) - latents(single)).max() < 1e-5


def wait_for_finished(out, count, proc, limit=300):
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            with open(os.path.join(only_run(out), "metrics.json")) as f:
                if len(json.load(f)["finished_samples"]) >= count:
                    return
        except (ValueError, FileNotFoundError):
            pass
        time.sleep(0.2)
    raise AssertionError("no sample finished in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_keeps_finished_samples(tmp_path, sig):
    flags = ["--timesteps", "50", "--num_samples", "40", "--batch_size", "1", "--compare_sequential"]
    proc = launch(tmp_path, flags=flags, wait=False)
    wait_for_finished(tmp_path, 1, proc)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 15 and proc.returncode == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    assert "interrupted" in err and "Traceback" not in err
    run_dir = only_run(tmp_path)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["status"] == "interrupted" and 1 <= len(m["finished_samples"]) < 40
    assert latents(run_dir).shape[0] == len(m["finished_samples"])
    for s in m["samples"]:
        files = os.listdir(os.path.join(run_dir, f"sample_{s['index']}"))
        assert len([f for f in files if f.startswith("step_")]) == s["iterations"] + 1
    assert not [f for _, _, fs in os.walk(run_dir) for f in fs if ".tmp" in f], "no half-written files"


def test_a_dead_rank_stops_the_others(tmp_path):
    flags = ["--timesteps", "100", "--num_samples", "40", "--batch_size", "1", "--dist_timeout", "20"]
    proc = launch(tmp_path, torchrun(2, free_port()), flags=flags, wait=False)
    wait_for_finished(tmp_path, 1, proc)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _env_of(int(p)).get("RANK") == "1"
               and _env_of(int(p)).get("MASTER_PORT") and str(proc.pid) in _ancestors(int(p))]
    assert workers, "rank 1 not found"
    t0 = time.time()
    os.kill(workers[0], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90


def _env_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
    except OSError:
        return {}


def _ancestors(pid):
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        out.append(str(pid))
    return out


def _lines(stderr):
    """stderr without the progress bars."""
    parts = [p.strip() for p in stderr.replace("\r", "\n").splitlines()]
    return [p for p in parts if p and not p.startswith(("samples:", "iterations:")) and p != "\x1b[A"]


def test_interrupt_while_importing_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output_path", str(tmp_path / "o")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 60:  # wait until torch's library is being loaded, then interrupt
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and _lines(err) == ["parallel_dit.py: interrupted (nothing written)"], err
    assert not (tmp_path / "o").exists()


def launcher(port):
    return ["-m", "runner.launcher", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def test_the_launcher_silences_every_torchelastic_logger():
    """The agent's "Received SIGTERM death signal" warning came through in one CI run out of many: its logger has
    a level of its own, so silencing the parent alone depended on where the signal landed."""
    import logging
    from runner.launcher import quiet_elastic_logs
    quiet_elastic_logs()
    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic.agent")]
    assert "torch.distributed.elastic.agent.server.api" in names
    assert not any(logging.getLogger(n).isEnabledFor(logging.ERROR) for n in names)


@pytest.mark.parametrize("codes, code, said", [([1, -15], 1, False), ([2, -15], 2, False), ([-9], 137, True),
                                               ([-15, 1], 1, False)])
def test_the_launch_exits_with_the_failed_process_code(codes, code, said, capsys):
    """A process that failed (its line said) with exit 1, the other stopped by the launcher's SIGTERM: the launch
    exited 143 and said "a process was killed by SIGTERM", blaming the signal for the failure."""
    from runner.launcher import leave_failed
    with pytest.raises(SystemExit) as e:
        leave_failed("parallel_dit.py", codes)
    assert e.value.code == code
    assert ("killed by SIGKILL" in capsys.readouterr().err) == said


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_to_a_launch_of_two_processes(tmp_path, sig):
    """The terminal sends Ctrl-C to the whole process group: the launcher and every process."""
    flags = ["--timesteps", "50", "--num_samples", "40", "--batch_size", "1"]
    proc = launch(tmp_path, launcher(free_port()), flags=flags, wait=False)  # its own session: a process group
    wait_for_finished(tmp_path, 1, proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    lines = _lines(err)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith("parallel_dit.py: interrupted (") and "kept in" in lines[0], lines
    assert lines[1] == f"parallel_dit.py: launch interrupted by {signal.Signals(sig).name}"
    m = read_metrics(only_run(tmp_path))
    assert m["status"] == "interrupted" and len(m["finished_samples"]) >= 1


# what main does, the exit code, the first line on stderr
ENDINGS = {"interrupted": ("raise Interrupted(2)", 130, "interrupted (nothing written)"),
           "failed": ("raise InputFileError('x.pt: not found')", 1, "error: x.pt: not found")}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_process_in_a_group_that_fails_leaves_without_the_teardown(ending):
    """A process of a launch (a process group is up) leaves after its one line without Python's exit teardown,
    where a group thread left running (by the signal, by a peer stuck or gone) can abort with a C++ "terminate
    called" line; a process on its own exits normally. The atexit hook stands for that teardown."""
    action, code, line = ENDINGS[ending]
    script = f"""
import atexit, os, sys
sys.path.insert(0, {ROOT!r})
import torch.distributed as dist
from runner.errors import InputFileError, Interrupted, exit_on_error
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
atexit.register(lambda: print("teardown ran", file=sys.stderr, flush=True))
def main(args):
    {action}
exit_on_error(main, None)
"""
    for mode, teardown in (("group", False), ("alone", True)):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == code, proc.stderr
        assert lines[0].endswith(line), lines
        assert ("teardown ran" in lines) == teardown and len(lines) == 1 + teardown, lines


@pytest.mark.parametrize("text", [
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/unbound_buffer.cc:129] Timed out waiting 5000ms for recv "
    "operation to complete", "wait timeout after 2000ms, keys: /none"])
def test_a_peer_that_does_not_answer_in_time_is_said_as_such(text, monkeypatch, capsys):
    """A process slower than --dist_timeout (a sleep in its model, in a helper's probe): the others' line was gloo's
    or the store's text, called unexpected, naming neither the flag nor another process."""
    from runner.errors import exit_on_error

    def main(args):
        raise RuntimeError(text)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        exit_on_error(main, None)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(lines) == 1, lines
    assert "did not answer" in lines[0] and "--dist_timeout" in lines[0] and "unexpected" not in lines[0], lines


@pytest.mark.parametrize("rank, prefix", [("0", "error: "), ("1", "error (process 1): ")])
def test_a_peer_gone_is_said_as_such(rank, prefix, monkeypatch, capsys):
    """A process whose peer failed first (rank 0 out of disk, rank 1 killed) fails in its next collective; its line
    was gloo's transport text ("[.../gloo/transport/tcp/pair.cc:561] Connection closed by peer ... GLHF!"), which
    read as a second failure. The text is the one torch 2.14's gloo raised in a 2-process launch of parallel_dit.py
    whose rank 0 ran out of disk."""
    from runner.errors import exit_on_error

    def main(args):
        raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed "
                           "by peer [127.0.0.1]:5346. This is typically caused by a remote worker crashing.")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launch's: RANK 1 alone is no rank (runner.environment)
    with pytest.raises(SystemExit) as e:
        exit_on_error(main, None)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(lines) == 1, lines
    assert prefix + "lost the connection to another process of the run" in lines[0] and "gloo" not in lines[0]


def test_the_solvers_non_finite_states_are_said_as_they_are(capsys):
    """The solver's FloatingPointError (states non-finite with finite model outputs) is one line like the model's
    NonFiniteModelOutput, not an "unexpected" error asking for a traceback."""
    import torch
    from paratAA import solve
    from runner.errors import exit_on_error
    from tests.conftest import gmm_problem
    _, schedule, noise = gmm_problem(10)
    with pytest.raises(SystemExit) as e:
        exit_on_error(lambda args: solve(lambda x, t, c: x * 0 + 1e308, schedule, noise, model_dtype=torch.float64),
                      None)
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 1 and len(lines) == 1 and "unexpected" not in lines[0], lines
    assert lines[0].endswith("error: the states of sample 0 became non-finite before iteration 2 while the model's "
                             "outputs were finite: its predictions are too large for the schedule's steps")


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_run_is_complete_ends_the_process_silently(name):
    """Once main has returned every file is written: a signal arriving then (while the streams are restored, or
    the interpreter exits) ends the process by its default action: no line calling the run interrupted, no
    traceback, no "Exception ignored". Here it arrives right after exit_on_error returns."""
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
from runner.errors import exit_on_error
exit_on_error(lambda args: print("done", flush=True), None)
os.kill(os.getpid(), signal.{name})
time.sleep(10)
print("not reached", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (-getattr(signal, name), "done\n", "")


def test_a_launch_that_succeeds_closes_its_process_group_and_skips_the_teardown(tmp_path):
    """Every process of a launch that succeeded closes the group itself (a last barrier, then
    destroy_process_group) while the interpreter is whole, and then leaves by os._exit(0), without Python's and the
    C++ runtime's teardown: with the group closed, a thread of torch.distributed still aborted 2-3 of 20 launches of
    3 CPU processes in that teardown on one machine ("terminate called without an active exception", exit -6).
    os._exit records what it saw; the atexit hook stands for the teardown."""
    script = tmp_path / "ok.py"
    # each process writes its own files: lines the three print to one pipe can interleave
    script.write_text(f"""
import atexit, os, sys
sys.path.insert(0, {ROOT!r})
import torch
import torch.distributed as dist
from runner.errors import exit_on_error
dist.init_process_group("gloo")
path = os.path.join({str(tmp_path)!r}, f"{{os.environ['LAUNCH']}}-rank{{dist.get_rank()}}")
atexit.register(lambda: open(path + ".teardown", "w").write("ran"))
real_exit = os._exit
def leave(code):
    open(path + ".exit", "w").write(f"code {{code}}, group open: {{dist.is_initialized()}}")
    real_exit(code)
os._exit = leave
def main(args):
    x = torch.ones(3) * (dist.get_rank() + 1)
    dist.all_reduce(x)
    return x
exit_on_error(main, None)
""")
    for launch in range(3):
        proc = subprocess.run([sys.executable, *torchrun(3, free_port()), str(script)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "LAUNCH": str(launch)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        said = [(tmp_path / f"{launch}-rank{r}.exit").read_text() for r in range(3)]
        assert said == ["code 0, group open: False"] * 3, said
    assert not list(tmp_path.glob("*.teardown"))


def test_a_bad_flag_in_a_launch_of_two_processes_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, *launcher(free_port()), SCRIPT, "--window_size", "0", "--output_path",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and _lines(proc.stderr) == [
        "parallel_dit.py: error: --window_size must be an integer >= 1 or auto, got 0"], proc.stderr


def test_processes_given_different_flags_are_one_line(tmp_path):
    """Each process samples with its own flags: process 1 given another --cfg_scale shared the model calls and the
    run wrote a sample 0.70 off either command's, with exit 0 (another --seed ended in gloo's abort, exit 134). A
    path may differ between nodes (their own mounts); nothing else may."""
    wrapper = tmp_path / "parallel_dit.py"  # the script, with a flag added on process 1
    wrapper.write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "if os.environ.get('RANK') == '1':\n"
        "    sys.argv += os.environ['EXTRA_FLAGS'].split()\n"
        f"runpy.run_path({os.path.join(ROOT, 'parallel_dit.py')!r}, run_name='__main__')\n")
    flags = ["--timesteps", "5", "--num_samples", "2", "--window_size", "5"]
    for extra, code in (("--cfg_scale 2", 2), (f"--output_path {tmp_path / 'elsewhere'}", 0)):
        proc = subprocess.run([sys.executable, *launcher(free_port()), str(wrapper), *flags, "--output_path",
                               str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "EXTRA_FLAGS": extra})
        assert proc.returncode == code, proc.stderr
        if code:
            assert _lines(proc.stderr) == ["parallel_dit.py: error: the 2 processes of this run were given different "
                                           "flags (paths aside): each node must run the same command"], proc.stderr
            assert not (tmp_path / "o").exists()
    assert len(os.listdir(tmp_path / "o")) == 1  # the main process's path: it writes the run


def test_a_killed_run_can_be_told_from_a_live_one(tmp_path):
    """metrics.json names the writing process (pid, host) from the start, and its heartbeat stops with it."""
    import socket
    proc = launch(tmp_path, flags=["--timesteps", "50", "--num_samples", "40", "--batch_size", "1"], wait=False)
    wait_for_finished(tmp_path, 1, proc)
    m = read_metrics(only_run(tmp_path))
    assert m["status"] == "running" and m["pid"] == proc.pid and m["host"] == socket.gethostname()
    assert m["heartbeat_seconds"] > 0 and m["heartbeat"] and m["started"]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    m = read_metrics(only_run(tmp_path))
    assert m["status"] == "running"  # what a reader sees: the pid is gone and the heartbeat gets old
    with pytest.raises(ProcessLookupError):
        os.kill(m["pid"], 0)


def test_the_heartbeat_is_rewritten_while_a_run_lives(tmp_path, monkeypatch):
    import argparse
    from paratAA import SolverConfig
    from runner import writer as writer_module
    monkeypatch.setattr(writer_module, "HEARTBEAT", 0.05)
    args = argparse.Namespace(timesteps=5, eta=0.0, cfg_scale=1.0, compare_sequential=False)
    beats = []
    with writer_module.RunWriter(str(tmp_path), None, args, SolverConfig().resolve(5), "test", dict, 0):
        for _ in range(20):
            time.sleep(0.03)
            try:
                beats.append(read_metrics(str(tmp_path))["heartbeat"])
            except (ValueError, FileNotFoundError):
                pass
    assert read_metrics(str(tmp_path))["status"] == "complete"
    assert len(set(beats)) >= 3, beats


def launcher_of_one():
    """accelerate's simple launcher (one process, no process group), with every flag given so that accelerate
    prints no note of its own defaults."""
    return ["-m", "runner.launcher", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


@pytest.mark.parametrize("flag, value", [("--num_processes", "0"), ("--num_processes", "-1"),
                                         ("--num_machines", "0")])
def test_a_launch_of_no_processes_is_refused(tmp_path, flag, value):
    """accelerate launches one process for --num_processes 0 or -1; the launcher refuses them, as the scripts
    refuse a bad flag."""
    argv = launcher_of_one()
    argv[argv.index(flag) + 1] = value
    proc = subprocess.run([sys.executable, *argv, SCRIPT, "--output_path", str(tmp_path / "o")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and _lines(proc.stderr) == [
        f"runner.launcher: error: {flag} must be an integer >= 1, got {value}"], proc.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("change, line", [
    (lambda argv: argv[:argv.index("--num_processes") + 1] + ["abc"] + argv[argv.index("--num_processes") + 2:],
     "runner.launcher: error: argument --num_processes/--num-processes: invalid int value: 'abc'"),
    (lambda argv: argv[:-1] + ["nonexistent.py"], "runner.launcher: error: the script to launch is not a file: "
                                                  "nonexistent.py")])
def test_a_launcher_flag_that_cannot_be_used_is_one_line(change, line):
    """A flag value accelerate's parser refuses printed its whole usage (113 lines) before the error; a script that
    is not there was said by every process, in Python's words."""
    argv = change(launcher_of_one() + [SCRIPT])
    proc = subprocess.run([sys.executable, *argv, "--timesteps", "5"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and _lines(proc.stderr) == [line], proc.stderr


def test_a_bad_flag_in_a_launch_of_one_process_is_one_line(tmp_path):
    """accelerate's simple launcher followed the script's line with a CalledProcessError traceback and exit 1."""
    proc = subprocess.run([sys.executable, *launcher_of_one(), SCRIPT, "--timesteps", "0", "--output_path",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and _lines(proc.stderr) == [
        "parallel_dit.py: error: --timesteps (number of sampling steps T) must be an integer in 1..1000, got 0"], \
        proc.stderr
    assert not (tmp_path / "o").exists()


def test_several_processes_asked_of_the_one_process_launcher_are_said(tmp_path):
    """Without --multi_gpu (or with --cpu) accelerate starts one process for --num_processes 2, silently."""
    argv = launcher_of_one()
    argv[argv.index("--num_processes") + 1] = "2"
    proc = subprocess.run([sys.executable, *argv, "--cpu", SCRIPT, "--timesteps", "0", "--output_path",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("parallel_dit.py: note: --num_processes 2 starts one process here")
    assert lines[1].startswith("parallel_dit.py: error: --timesteps")


@pytest.mark.parametrize("sig, to_the_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_ctrl_c_to_a_launch_of_one_process(tmp_path, sig, to_the_group):
    """Ctrl-C reaches the launcher's process group (the terminal's); a SIGTERM from a job scheduler, the launcher
    alone. Either way the process keeps its finished samples and says so once, and the launch exits with its code:
    accelerate's simple launcher added a KeyboardInterrupt traceback, or (SIGTERM) died, leaving it running."""
    flags = ["--timesteps", "50", "--num_samples", "40", "--batch_size", "1"]
    proc = launch(tmp_path, launcher_of_one(), flags=flags, wait=False)  # its own session: a process group
    wait_for_finished(tmp_path, 1, proc)
    if to_the_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    lines = _lines(err)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("parallel_dit.py: interrupted (") and "kept in" in lines[0], lines
    m = read_metrics(only_run(tmp_path))
    assert m["status"] == "interrupted" and len(m["finished_samples"]) >= 1


@pytest.mark.parametrize("closed", ["stderr", "stdout"])
def test_a_terminal_that_goes_away_does_not_stop_the_run(tmp_path, closed):
    """`... 2>&1 | head -1` closes the pipe after the first line: the progress bar's next write failed and the run
    ended with no run folder and no message. What the terminal is told is a courtesy; the run folder is the
    result, identical to an undisturbed run's."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *FLAGS, "--output_path", str(tmp_path / "cut")], cwd=ROOT,
                            stdout=subprocess.PIPE if closed == "stdout" else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if closed == "stderr" else subprocess.DEVNULL)
    getattr(proc, closed).close()  # the reader has gone before the first write
    assert proc.wait(timeout=600) == 0
    cut = only_run(tmp_path / "cut")
    assert read_metrics(cut)["status"] == "complete"
    assert np.array_equal(latents(cut), latents(launch(tmp_path / "whole")))


def run_in_process(script, argv, out, monkeypatch, save=None, grid=None):
    """script.main through exit_on_error in this process, with the writer's save_png (save(img, path, original))
    or draw_grid (grid(rows, reference, original)) replaced: an interrupt or a full disk at a chosen file.
    Returns the exit code (0: the run returned)."""
    from runner import writer
    from runner.errors import exit_on_error
    if save is not None:
        original_save = writer.save_png
        monkeypatch.setattr(writer, "save_png", lambda img, path: save(img, path, original_save))
    if grid is not None:
        original_grid = writer.draw_grid
        monkeypatch.setattr(writer, "draw_grid", lambda rows, reference: grid(rows, reference, original_grid))
    try:
        exit_on_error(script.main, script.parse_args([*argv, "--output_path", str(out)]))
    except SystemExit as e:
        return e.code
    finally:  # the handlers exit_on_error installs for the run
        from runner.errors import STOP_SIGNALS
        for s in STOP_SIGNALS:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
    return 0


def said(capsys):
    """The lines exit_on_error wrote (progress bars aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if ": error" in line or ": interrupted" in line]


DIT_BATCH = ["--timesteps", "6", "--window_size", "6", "--num_samples", "4", "--batch_size", "4"]


def failing_at(part, step, error):
    """A save_png that raises error() when it writes step_<step>.png of the folder named part."""
    def save(img, path, original):
        if os.path.basename(os.path.dirname(path)) == part and os.path.basename(path) == f"step_{step}.png":
            fail(path, error())
        original(img, path)
    return save


def fail(path, error):
    """error raised while path is written: an OSError from inside the atomic write (a full disk), as the file
    system raises it there."""
    from runner.rundir import write_atomic
    if not isinstance(error, OSError):
        raise error

    def write(tmp):
        open(tmp, "wb").close()
        raise error
    write_atomic(path, write)


@pytest.mark.parametrize("error, code, words, status", [
    (lambda: __import__("runner.errors").errors.Interrupted(signal.SIGINT), 130, ["interrupted"], "interrupted"),
    (lambda: OSError(28, "No space left on device"), 1, ["cannot write", "sample_2", "No space left on device"],
     "failed")])
def test_a_sample_cut_off_inside_a_batch_is_not_kept(tmp_path, monkeypatch, capsys, error, code, words, status):
    """Samples of a batch finish one by one: one interrupted (or whose disk filled) while its folder was written
    left that folder half-written and was listed in metrics.json while latents.npz had none of the batch (and a
    full disk left the run "running", said as an unexpected OSError naming no file)."""
    import parallel_dit
    assert run_in_process(parallel_dit, DIT_BATCH, tmp_path, monkeypatch, save=failing_at("sample_2", 2, error)) \
        == code
    err = said(capsys)
    assert len(err) == 1 and all(w in err[0] for w in words + ["2 finished samples kept"]), err
    run = only_run(tmp_path)
    m = read_metrics(run)
    assert m["status"] == status and m["finished_samples"] == [0, 1] and latents(run).shape[0] == 2
    assert sorted(f for f in os.listdir(run) if f.startswith("sample_")) == ["sample_0", "sample_1"]
    assert not [f for _, _, fs in os.walk(run) for f in fs if ".tmp" in f]


def test_the_last_writes_of_a_run(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the run writes its last files is held until they are written (it ended the run "running",
    with a line saying nothing was written); a disk that fills then ends it "failed", keeping the samples."""
    import parallel_dit

    def ctrl_c(rows, reference, original):
        os.kill(os.getpid(), signal.SIGINT)
        return original(rows, reference)
    assert run_in_process(parallel_dit, DIT_BATCH, tmp_path / "a", monkeypatch, grid=ctrl_c) == 0
    m = read_metrics(only_run(tmp_path / "a"))
    assert m["status"] == "complete" and m["finished_samples"] == [0, 1, 2, 3]
    assert os.path.isfile(os.path.join(only_run(tmp_path / "a"), "grid.png"))

    def full(img, path, original):
        if os.path.basename(path) == "grid.png":
            fail(path, OSError(28, "No space left on device"))
        original(img, path)
    capsys.readouterr()
    assert run_in_process(parallel_dit, DIT_BATCH, tmp_path / "b", monkeypatch, save=full) == 1
    (line,) = said(capsys)
    assert "grid.png" in line and "No space left on device" in line and "4 finished samples kept" in line
    assert read_metrics(only_run(tmp_path / "b"))["status"] == "failed"


def test_a_warm_start_interrupted_in_prompt2_says_prompt1_is_kept(tmp_path, monkeypatch, capsys):
    import parallel_sd_winit

    def save(img, path, original):
        if f"{os.sep}prompt2{os.sep}" in path:
            raise __import__("runner.errors").errors.Interrupted(signal.SIGINT)
        original(img, path)
    argv = ["--timesteps", "8", "--variation_steps", "4", "--num_samples", "2", "--batch_size", "2",
            "--window_size", "8"]
    assert run_in_process(parallel_sd_winit, argv, tmp_path, monkeypatch, save=save) == 130
    (line,) = said(capsys)
    run = only_run(tmp_path)
    assert f"2 finished samples kept in {os.path.join(run, 'prompt1')}" in line, line
    assert read_metrics(os.path.join(run, "prompt1"))["status"] == "complete"
    assert not os.path.exists(os.path.join(run, "prompt2"))


def test_a_full_disk_met_by_the_heartbeat_is_left_to_the_run(tmp_path, monkeypatch):
    """The heartbeat thread rewrites metrics.json every few seconds: a full disk there printed a traceback of the
    thread; the run's own next write says it in one line."""
    import argparse
    import threading
    from paratAA import SolverConfig
    from runner import writer as writer_module
    from runner.errors import OutputError
    monkeypatch.setattr(writer_module, "HEARTBEAT", 0.02)
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: died.append(hook.exc_type))
    args = argparse.Namespace(timesteps=5, eta=0.0, cfg_scale=1.0, compare_sequential=False)
    original = writer_module.save_json

    def full(*_, **__):
        raise OutputError("cannot write metrics.json (No space left on device)")
    with writer_module.RunWriter(str(tmp_path), None, args, SolverConfig().resolve(5), "test", dict, 0):
        monkeypatch.setattr(writer_module, "save_json", full)
        time.sleep(0.2)
        monkeypatch.setattr(writer_module, "save_json", original)
    assert died == [] and read_metrics(str(tmp_path))["status"] == "complete"


@pytest.mark.parametrize("value, traceback", [("", False), ("0", False), ("off", False), ("False", False),
                                              ("1", True), ("yes", True)])
def test_the_debug_variable_is_read_as_a_switch(value, traceback, monkeypatch, capsys):
    """PARATAA_DEBUG=0 gave the traceback, as any value did: the one line of an unexpected error is said unless the
    variable says on."""
    from runner.errors import exit_on_error
    monkeypatch.setenv("PARATAA_DEBUG", value)
    monkeypatch.delenv("RANK", raising=False)
    if traceback:
        with pytest.raises(ZeroDivisionError):
            exit_on_error(lambda args: 1 / 0, None)
    else:
        with pytest.raises(SystemExit) as e:
            exit_on_error(lambda args: 1 / 0, None)
        assert e.value.code == 1 and "ZeroDivisionError: division by zero (unexpected" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["SIGHUP", "SIGQUIT"])
def test_a_closed_terminal_stops_a_run_as_ctrl_c_does(tmp_path, monkeypatch, capsys, name):
    """SIGHUP (the terminal closed, an ssh session dropped) and SIGQUIT (Ctrl-\\) killed the run by their default
    action: no line, the run folder left "running" with no grid. Now as SIGINT: finished samples kept, 128 + the
    signal."""
    import parallel_dit
    sig = getattr(signal, name)

    def hang_up(img, path, original):
        if os.path.basename(os.path.dirname(path)) == "sample_2" and os.path.basename(path) == "step_0.png":
            os.kill(os.getpid(), sig)
        original(img, path)
    assert run_in_process(parallel_dit, DIT_BATCH, tmp_path, monkeypatch, save=hang_up) == 128 + sig
    err = said(capsys)
    assert len(err) == 1 and "interrupted" in err[0] and "2 finished samples kept" in err[0], err
    m = read_metrics(only_run(tmp_path))
    assert m["status"] == "interrupted" and m["finished_samples"] == [0, 1]


def test_a_run_with_its_output_closed_samples(tmp_path):
    """Started with stdout closed (`>&-`), Python's sys.stdout is None: the first print failed, "AttributeError:
    'NoneType' object has no attribute 'flush' (unexpected)". What the terminal is told goes nowhere; the run writes
    its folder."""
    proc = subprocess.run(f"{sys.executable} parallel_dit.py --timesteps 5 --num_samples 1 --window_size 5 "
                          f"--output_path {tmp_path / 'runs'} >&-", shell=True, cwd=ROOT, capture_output=False,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_metrics(only_run(tmp_path / "runs"))["status"] == "complete"
