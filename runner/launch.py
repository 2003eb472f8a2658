"""The processes of a run: accelerate's process group, this process's device, and the sharding of model calls."""
import ctypes
import hashlib
import json
import os
from datetime import timedelta

import torch

from paratAA import Sharding
from runner.environment import launch_env_problem
from runner.errors import UsageError


class Session:
    """One process of a run: device, whether it writes (the main process), and how model calls are sharded.

    On GPUs each process takes one; with no GPU the processes run on CPU (accelerate needs cpu=True for several
    CPU processes to form a group). dist_timeout bounds how long a process waits for a dead peer."""

    def __init__(self, dist_timeout=300.0, fp16=False):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        wait = InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[wait])
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world_size = self.accelerator.num_processes
        self.sharding = Sharding.from_accelerator(self.accelerator)
        self.model_dtype = torch.float16 if fp16 else torch.float32
        torch.set_grad_enabled(False)
        if self.device.type == "cpu":
            keep_freed_memory()

    def free_memory(self):
        """(bytes free on this process's device, bytes of host memory available); None where unknown."""
        host = host_memory_available()
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0], host
        return host, host

    def wait(self):
        """Every process reaches this point before any goes on."""
        self.accelerator.wait_for_everyone()


M_TOP_PAD = -2          # glibc's mallopt parameter: bytes malloc keeps at the top of its heap when it trims
HOST_PAD = 256 << 20


def keep_freed_memory(pad=HOST_PAD):
    """Ask the C library's malloc (glibc, Linux) to keep `pad` bytes of freed memory instead of handing it back to
    the system after every model call. On a CPU the model's activations are freed at the end of each call; given
    back, the next call faults the same pages in again. On the embedded text-to-image model (2 cores) a run at
    window 32 took 0.20 s in a fresh process against 0.155 s with this, or after one larger call had grown the heap;
    window 16 gained 4-8%, sequential sampling little (BENCHMARKS.md, section 2). The price is up to `pad` bytes of
    host memory held. A process-wide setting, made by the scripts' CPU processes only: a library call
    (models.pipelines.parallel_sample) leaves its caller's process as it found it. Returns whether it was set (False
    where there is no mallopt: macOS, Windows)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_TOP_PAD, pad))
    except (OSError, AttributeError, TypeError):
        return False


def host_memory_available():
    """Bytes of host memory available (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def start_session(args):
    problem = launch_env_problem(os.environ)
    if problem:
        raise UsageError(f"{problem} (accelerate launch and torchrun set these; unset them to run one process)")
    session = Session(args.dist_timeout, args.fp16)
    digest = flags_digest(args)
    if session.sharding.min(digest) != session.sharding.max(digest):
        raise UsageError(f"the {session.world_size} processes of this run were given different flags (paths aside): "
                         f"each node must run the same command")
    return session


def flags_digest(args):
    """A number that differs where two processes' flags do (paths aside, which may differ between nodes with
    their own mounts). Each process samples with its own flags: a node given another --cfg_scale shared the model
    calls and wrote a sample 0.70 off either command's, with exit 0, and another --seed or --timesteps ended in the
    collective library's abort or a timeout. 48 bits: exact in the float64 the collectives carry."""
    flags = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and not k.endswith("_path")}
    return int(hashlib.sha256(json.dumps(flags, default=repr).encode()).hexdigest()[:12], 16)
