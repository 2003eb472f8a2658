"""Determinism across reruns, process counts and (simulated) nodes; interrupts and dead ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, free_port, only_run, read_latents as latents

SCRIPT = os.path.join(ROOT, "parallel_dit.py")
FLAGS = ["--timesteps", "20", "--num_samples", "3", "--batch_size", "2", "--eta", "0.4", "--seed", "11"]


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
    assert time.time() - t0 < 15 and proc.returncode == 130
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
