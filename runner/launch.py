"""The processes of a run: accelerate's process group, this process's device, and the sharding of model calls."""
from datetime import timedelta

import torch

from paratAA import Sharding


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

    def free_memory(self):
        """(bytes free on this process's device, bytes of host memory available); None where unknown."""
        host = host_memory_available()
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0], host
        return host, host

    def wait(self):
        """Every process reaches this point before any goes on."""
        self.accelerator.wait_for_everyone()


def host_memory_available():
    """Bytes of host memory available (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def start_session(args):
    return Session(args.dist_timeout, args.fp16)
