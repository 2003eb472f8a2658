"""Splitting the window batch across processes: even shards, order kept, same result for any world size."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paratAA import Sharding, sample_sequential, shard_bounds, solve
from tests.conftest import free_port, gmm_problem


@pytest.mark.parametrize("world", range(1, 9))
def test_shard_bounds_are_even_contiguous_and_cover(world):
    for n in range(0, 25):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        sizes = [e - s for s, e in bounds]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert bounds[0][0] == 0 and all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))


def _worker(rank, world, port, out_dir, problem):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # must not matter: all randomness is in the noise tensor
        model, schedule, noise, kwargs = problem()
        seen = []
        counting = lambda x, t, c: (seen.append(x.shape[0]), model(x, t, c))[1]  # noqa: E731
        out = solve(counting, schedule, noise, sharding=Sharding(rank, world), model_dtype=torch.float64, **kwargs)
        seq = sample_sequential(model, schedule, noise, sharding=Sharding(rank, world), model_dtype=torch.float64)
        torch.save({"traj": out.trajectory, "iters": out.iterations, "seen": seen, "seq": seq},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gmm_window_problem():
    model, schedule, noise = gmm_problem(24, batch=3, eta=0.5)
    return model, schedule, noise, dict(window_size=5, memory_size=3)


def _tiny_window_problem():  # two inputs per iteration: some ranks have nothing to evaluate
    model, schedule, noise = gmm_problem(6, batch=1)
    return model, schedule, noise, dict(window_size=2, memory_size=2)


@pytest.mark.parametrize("world, problem", [(2, _gmm_window_problem), (3, _gmm_window_problem),
                                            (4, _tiny_window_problem)])
def test_world_sizes_give_the_same_result(tmp_path, world, problem):
    model, schedule, noise, kwargs = problem()
    alone = solve(model, schedule, noise, model_dtype=torch.float64, **kwargs)
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), problem), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    seq = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    for r, res in enumerate(results):
        assert res["iters"] == alone.iterations
        assert torch.allclose(res["traj"], alone.trajectory, atol=1e-12, rtol=0)
        assert torch.allclose(res["seq"], seq, atol=1e-12, rtol=0)
    assert all(results[0]["seen"]), "rank 0 evaluates a share of every call"
    if problem is _tiny_window_problem:  # at most two inputs per call: ranks 2 and 3 only join the gathers
        assert results[2]["seen"] == [] and results[3]["seen"] == []


def test_world_size_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        Sharding(0, 2)


def _out_of_memory_worker(rank, world, port, out_dir):
    import datetime
    import time
    from paratAA import SolverConfig
    from paratAA.planner import plan_window
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a process left waiting fails, not hangs
    try:
        model, schedule, noise = gmm_problem(20, batch=2)

        def eps_fn(x, t, c):  # only rank 0's device is short of memory: a shard of more than 4 inputs
            if rank == 0 and x.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory")
            # a call of any size takes about as long, as on a GPU with room to spare: the closed-form model's
            # microseconds, timed on a loaded machine, could read as a call twice its half's, which ends the
            # measurement (compute-bound) before the size out of memory (twice in a loaded run)
            time.sleep(0.005)
            return model(x, t, c)
        plan = plan_window(eps_fn, schedule, noise, None, SolverConfig(window_size="auto"), Sharding(rank, world),
                           torch.float64, solve=solve)
        out = solve(eps_fn, schedule, noise, window_size="auto", tol1=0, tol2=0, sharding=Sharding(rank, world),
                    model_dtype=torch.float64)
        torch.save({"window": plan.window, "max_inputs": plan.max_inputs, "samples": out.samples},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_process_out_of_memory_while_the_window_is_planned_leaves_none_waiting(tmp_path):
    """One process's device runs out of memory at a size the others take: every process must see it (the others
    were left in the gather) and choose among the sizes that fit on all."""
    mp.spawn(_out_of_memory_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, schedule, noise = gmm_problem(20, batch=2)
    seq = sample_sequential(model, schedule, noise, model_dtype=torch.float64)[:, 0]
    assert results[0]["max_inputs"] == results[1]["max_inputs"] == 8  # 16 inputs: a shard of 8 on rank 0
    assert results[0]["window"] == results[1]["window"] <= 4
    for res in results:
        assert torch.allclose(res["samples"], seq, atol=1e-10, rtol=0)
