"""Splitting one iteration's batch of window inputs across processes.

Every rank holds the whole solver state and the whole batch of inputs; each evaluates the model on its own
contiguous shard and the outputs are gathered back, in order, on every rank. A guided evaluation (conditional
and unconditional pass) belongs to one input, so classifier-free guidance pairs never straddle two ranks.
"""
import torch
import torch.distributed as dist

from .denoiser import take


def shard_bounds(n, rank, world_size):
    """[start, end) of rank's shard of n inputs: sizes differ by at most one, larger shards first."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Sharding:
    """Where this process sits among the processes that share the window (world_size 1: no communication)."""

    def __init__(self, rank=0, world_size=1, device=None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group "
                               "(launch with accelerate launch or torchrun)")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device or "cpu")  # where collectives put their tensors (NCCL: a GPU)

    @classmethod
    def from_accelerator(cls, accelerator):
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    def _reduce(self, value, op):
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t[0])

    def max(self, value):
        """The largest of every process's value (e.g. a time: a collective ends with its slowest process)."""
        return self._reduce(value, dist.ReduceOp.MAX)

    def min(self, value):
        return self._reduce(value, dist.ReduceOp.MIN)

    def from_main(self, value):
        """The main process's value, on every process (so that all take the same decision)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t[0])

    def evaluate(self, fn, x, *args):
        """fn(x[shard], *[a[shard] for a in args]) on this rank's shard, gathered as float64 [N, ...].

        fn must return a tensor shaped like its x. Ranks with an empty shard still join the collective."""
        n = x.shape[0]
        if self.world_size == 1:
            return fn(x, *args).to(torch.float64)
        start, end = shard_bounds(n, self.rank, self.world_size)
        size = shard_bounds(n, 0, self.world_size)[1]  # the largest shard, which every rank pads to
        out = torch.zeros((size,) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
        if end > start:
            out[: end - start] = fn(x[start:end], *[take(a, start, end) for a in args]).to(torch.float64)
        parts = [torch.empty_like(out) for _ in range(self.world_size)]
        dist.all_gather(parts, out)
        return torch.cat([p[: e - s] for p, (s, e) in
                          zip(parts, (shard_bounds(n, r, self.world_size) for r in range(self.world_size)))])

