"""The window chosen from the hardware (planner), and what every run says it gained (metrics.json, terminal, grid)."""
import json
import math
import os
import time

import numpy as np
import pytest
import torch

import parallel_dit
from paratAA import SolverConfig, sample_sequential, solve
from paratAA.planner import ALPHA, BETA, choose, measure_call_seconds, predicted_iterations
from paratAA.sharding import Sharding
from runner.writer import CUT, EMPTY, FINAL, STOP, draw_grid
from tests.conftest import ROOT, gmm_problem, read_metrics


def test_iteration_model_is_exact_at_window_one():
    assert predicted_iterations(100, 1) == 100
    assert predicted_iterations(100, 100) == pytest.approx(ALPHA + BETA)
    assert predicted_iterations(10, 2) == 10  # never above T


def test_a_busy_device_gets_window_one_an_idle_one_a_large_window():
    T, solver = 100, {1: 1e-5, 100: 1e-4}
    busy = {n: 0.01 * n for n in (1, 2, 4, 8, 16, 32, 64, 100)}        # a call of n costs n calls of one
    idle = {n: 0.01 + 1e-5 * n for n in (1, 2, 4, 8, 16, 32, 64, 100)}  # nearly free batching
    assert choose(T, 1, busy, solver).window == 1
    plan = choose(T, 1, idle, solver)
    assert plan.window >= 32 and plan.predicted_sequential_seconds / plan.predicted_seconds > 5


def test_tolerance_zero_takes_t_iterations_at_every_window_so_the_planner_takes_window_one(monkeypatch):
    """With tol1 = tol2 = 0 no state passes before its inputs are final: the iteration model's K(W) would promise
    ~7 iterations at window 100, and auto chose a window that sampled 2x slower than sequential (tiny SDXL, CPU)."""
    T = 12
    eps, schedule, noise = gmm_problem(T)
    for W in (3, T):
        assert solve(eps, schedule, noise, None, SolverConfig(window_size=W, tol1=0, tol2=0)).iterations[0] >= T - 1
    idle = {n: 0.01 + 1e-5 * n for n in (1, 2, 4, 8, 12)}
    plan = choose(T, 1, idle, {1: 1e-5, T: 1e-4}, exact=True)
    assert plan.window == 1 and plan.predicted_iterations == T and choose(T, 1, idle, {1: 1e-5, T: 1e-4}).window > 1
    # plan_window tells choose so from the config, on the same measured curve
    import paratAA.planner as planner
    monkeypatch.setattr(planner, "measure_call_seconds", lambda *a: {n * noise.shape[0]: v for n, v in idle.items()})
    for tol, exact in ((0.0, True), (1e-4, False)):
        config = SolverConfig(window_size="auto", tol1=tol, tol2=tol).resolve(T)
        plan = planner.plan_window(eps, schedule, noise, None, config, Sharding(), torch.float64, solve=solve)
        assert (plan.window == 1) == exact


def test_a_plan_predicts_the_iterations_max_steps_allows(tmp_path, monkeypatch):
    """--max_steps caps the iterations; the plan predicted those of the whole solve: a run cut at 4 of 40 iterations
    said "predicted 0.17 s" for 0.02 s of sampling. The window stays the one the whole solve is best at."""
    T, solver = 40, {1: 1e-5, 40: 1e-4}
    idle = {n: 0.01 + 1e-5 * n for n in (1, 2, 4, 8, 16, 32, 40)}
    full, capped = choose(T, 1, idle, solver), choose(T, 1, idle, solver, max_iterations=4)
    assert capped.window == full.window and full.predicted_iterations > 4 and capped.predicted_iterations == 4
    assert capped.predicted_seconds == pytest.approx(full.predicted_seconds * 4 / full.predicted_iterations)
    assert choose(T, 1, idle, solver, max_iterations=T + 5).predicted_seconds == full.predicted_seconds
    # plan_window reads the cap from the config, counted as max_steps is (reference_quirks: max_steps - 1)
    import paratAA.planner as planner
    eps, schedule, noise = gmm_problem(T)
    monkeypatch.setattr(planner, "measure_call_seconds", lambda *a: dict(idle))
    for config, cap in ((SolverConfig(window_size="auto", max_steps=4), 4),
                        (SolverConfig.paper(window_size="auto", max_steps=4), 3)):
        plan = planner.plan_window(eps, schedule, noise, None, config.resolve(T), Sharding(), torch.float64,
                                   solve=solve)
        assert plan.predicted_iterations == cap
    # and a script's run records the plan of the iterations it made
    monkeypatch.undo()
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    _, m = run(tmp_path / "run", "--timesteps", "20", "--max_steps", "3", "--num_samples", "1")
    assert m["window_chosen_by"] == "planner" and m["samples"][0]["iterations"] <= 3
    assert m["plan"]["predicted_iterations"] <= 3


def test_a_smaller_call_never_costs_more_than_a_larger_one():
    # a slow first size (noise: a clock ramping up) must not inflate the sequential estimate T c(1)
    _, schedule, noise = gmm_problem(8)

    def model(x, t, cond):
        time.sleep(0.03 if x.shape[0] == 1 else 0.002)
        return torch.zeros_like(x)
    calls = measure_call_seconds(model, schedule, noise, None, Sharding(), torch.float64, [1, 2, 4])
    assert sorted(calls) == [1, 2, 4]
    assert calls[1] <= calls[2] < 0.02 and calls[2] <= calls[4]


def test_auto_window_solves_and_records_its_plan():
    model, schedule, noise = gmm_problem(30, batch=2)
    out = solve(model, schedule, noise, window_size="auto", model_dtype=torch.float64)
    assert isinstance(out.config.window_size, int) and out.plan.window == out.config.window_size
    assert 1 in [n // 2 for n in out.plan.call_seconds] and out.plan.predicted_seconds > 0
    ref = solve(model, schedule, noise, window_size=out.plan.window, model_dtype=torch.float64)
    assert out.iterations == ref.iterations and torch.equal(out.samples, ref.samples)


def test_window_one_is_sequential_sampling_with_the_solvers_record():
    from paratAA import sample_sequential
    model, schedule, noise = gmm_problem(12, batch=2, eta=0.4)
    out = solve(model, schedule, noise, window_size=1, record_x0=True, model_dtype=torch.float64)
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    assert torch.equal(out.trajectory, ref) and out.iterations == [12, 12] and all(out.converged)
    h = out.history[0]
    assert h.boundary == list(range(11, -1, -1)) and len(h.x0) == 13 and torch.equal(h.x0[-1], ref[0, 0])
    capped = solve(model, schedule, noise, window_size=1, max_steps=5, model_dtype=torch.float64)
    assert capped.iterations == [5, 5] and not any(capped.converged)
    assert torch.equal(capped.samples, ref[:, 7])  # the lowest state reached stands in for x_0


def run(tmp_path, *flags):
    run_dir = parallel_dit.main(parallel_dit.parse_args(["--output_path", str(tmp_path), *flags]))
    return run_dir, read_metrics(run_dir)


def test_every_run_reports_its_speed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    _, m = run(tmp_path / "a", "--timesteps", "20", "--num_samples", "2", "--window_size", "8")
    speed = m["speed"]
    assert speed["sampling_seconds"] > 0 and speed["sequential_measured"] is False
    assert speed["sequential_seconds"] == pytest.approx(2 * 20 * m["per_call_seconds"])  # 2 batches of 20 calls
    assert speed["speedup"] == pytest.approx(speed["sequential_seconds"] / speed["sampling_seconds"])
    out = capsys.readouterr().out
    assert "(window 8, from the flags)" in out and "estimated from the measured time per call" in out
    _, m = run(tmp_path / "b", "--timesteps", "20", "--num_samples", "2", "--compare_sequential")
    assert m["speed"]["sequential_measured"] and m["speed"]["sequential_seconds"] == m["sequential_wall_clock_seconds"]
    same = [s["iterations_to_same_image"] for s in m["samples"]]
    assert m["speed"]["same_image_at"]["median"] == float(np.median(same))
    assert "same image as sequential sampling after" in capsys.readouterr().out
    assert set(m["indexing"]) and m["samples"][0]["stopped_by"] in ("stop rule", "boundary")


def test_samples_that_never_reach_the_image_count_in_the_median():
    """The median was over the samples that reached the sequential image only: with 2 of 3 missing it, it said 3
    iterations, the count of the one sample that got there. A sample that never did counts as later than any."""
    from runner.metrics import same_image_summary, speed_summary
    assert same_image_summary([3, 5, 4]) == {"median": 4.0, "max": 5, "never": 0, "samples": 3}
    assert same_image_summary([3, None, 4]) == {"median": 4.0, "max": None, "never": 1, "samples": 3}
    assert same_image_summary([3, 4, None, None])["median"] is None  # the middle pair: 4 and never
    assert same_image_summary([3, None, None])["median"] is None
    metrics = {"window_size": 8}
    samples = [{"iterations": 9}] * 3
    lines = speed_summary({**metrics, "speed": {"same_image_at": same_image_summary([3, None, None])}}, samples)
    assert lines[-1] == "same image as sequential sampling never (median; max never; 2 of 3 never did)"
    lines = speed_summary({**metrics, "speed": {"same_image_at": same_image_summary([None, None, None])}}, samples)
    assert lines[-1] == "no sample reached the sequential sample's image (3 of 3)"
    lines = speed_summary({**metrics, "speed": {"same_image_at": same_image_summary([3, 6, None])}}, samples)
    assert lines[-1] == "same image as sequential sampling after 6 iterations (median; max never; 1 of 3 never did)"


def test_auto_window_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    flags = ["--timesteps", "16", "--num_samples", "1", "--window_size", "auto"]
    _, first = run(tmp_path / "a", *flags)
    _, second = run(tmp_path / "b", *flags)
    assert first["plan"]["measured"] and not second["plan"]["measured"]
    assert first["plan"]["call_seconds"] == second["plan"]["call_seconds"]
    assert first["window_size"] == first["plan"]["window"] and first["window_chosen_by"] == "planner"
    with open(tmp_path / "cache" / "cost_curves.json") as f:
        assert len(json.load(f)) == 1


def test_the_grid_marks_the_final_and_the_stop_columns_and_pads_nothing():
    tile = np.full((8, 8, 3), 128, dtype=np.uint8)
    rows = [([tile] * 4, "0: class 1", 2, False), ([tile] * 2, "1: class 2", None, False)]
    grid = draw_grid(rows, "the sequential sample")
    colours = {tuple(c) for c in grid.reshape(-1, 3)}
    assert FINAL in colours and STOP in colours and EMPTY in colours and CUT not in colours
    # a sample --max_steps cut short is framed apart from one that finished (the same red frame before)
    cut = {tuple(c) for c in draw_grid([rows[0], rows[1][:3] + (True,)], "the sequential sample").reshape(-1, 3)}
    assert CUT in cut and STOP in cut
    # the second row stopped after iteration 1: its last two cells are empty, not copies of its last image
    empty = np.all(grid == np.array(EMPTY, dtype=np.uint8), axis=2)
    assert empty.sum() >= 2 * 64 * 64 * 0.9


def test_a_sample_cut_short_has_no_final_column_without_the_sequential_one(tmp_path, monkeypatch):
    """Without --compare_sequential the grid marks the first image within 1 gray level of the sample's own last:
    for a sample --max_steps cut short that was its last column, green beside orange, as if it had converged."""
    from runner import writer
    drawn = []
    monkeypatch.setattr(writer, "draw_grid", lambda rows, reference: drawn.append(rows) or np.zeros((2, 2, 3),
                                                                                                   np.uint8))
    _, cut_metrics = run(tmp_path / "cut", "--timesteps", "20", "--num_samples", "1", "--window_size", "20",
                         "--max_steps", "2")
    _, done_metrics = run(tmp_path / "done", "--timesteps", "20", "--num_samples", "1", "--window_size", "20")
    (_, _, final, cut), = drawn[0]
    assert cut and final is None
    # said in metrics.json's speed too (the terminal line said it; the JSON only per sample)
    assert cut_metrics["speed"]["unfinished"] == 1 and done_metrics["speed"]["unfinished"] == 0
    (_, _, final, cut), = drawn[1]
    assert not cut and final is not None


def test_timed_runs_are_warmed_up_at_the_sizes_they_time(tmp_path, monkeypatch):
    """Before the sampling and the sequential sampling are timed, one untimed call at each of their sizes (a GPU's
    first call at a size loads kernels; a run whose curve came from the cache has made no call yet)."""
    from types import SimpleNamespace
    from paratAA import Sharding, dit_schedule, noise_from_seeds
    from runner import planning
    sizes = []
    bundle = SimpleNamespace(eps_fn=lambda x, t, c: sizes.append(x.shape[0]) or torch.zeros_like(x),
                             schedule=dit_schedule(20))
    planning.warm_up(bundle.eps_fn, bundle.schedule, noise_from_seeds([0, 1], 20, (4, 4, 4)), None, Sharding(),
                     torch.float32, [8, 1, 8])
    assert sizes == [2 * 8, 2 * 1]  # B states per window position, each size once
    seen = []
    monkeypatch.setattr(planning, "warm_up", lambda *args: seen.append(list(args[-1])))  # the windows
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    run(tmp_path / "a", "--timesteps", "20", "--num_samples", "1", "--window_size", "8", "--compare_sequential")
    run(tmp_path / "b", "--timesteps", "20", "--num_samples", "1", "--window_size", "4")
    assert seen == [[8, 1], [4]]


@pytest.mark.parametrize("damage", ["empty", "text", "negative", "nan", "missing_batch", "no_solver_curve",
                                    "larger_calls_free"])
def test_a_damaged_cache_entry_is_measured_again(tmp_path, monkeypatch, damage):
    """A cache file someone edited (or a crash cut short) is not trusted: its entry is measured again, and the run
    reports times that are times."""
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    flags = ["--timesteps", "16", "--num_samples", "1", "--window_size", "auto"]
    run(tmp_path / "a", *flags)
    path = tmp_path / "cache" / "cost_curves.json"
    with open(path) as f:
        cache = json.load(f)
    (key, entry), = cache.items()
    calls = entry["call_seconds"]
    cache[key] = {"empty": {}, "text": {**entry, "call_seconds": {k: "x" for k in calls}},
                  "negative": {**entry, "call_seconds": {k: -1.0 for k in calls}},
                  "nan": {**entry, "call_seconds": {k: float("nan") for k in calls}},
                  "missing_batch": {**entry, "call_seconds": {"2": 0.1}},
                  # an IndexError (choose interpolates the solver's curve), then a ZeroDivisionError (a predicted 0 s)
                  "no_solver_curve": {**entry, "solver_seconds": {}},
                  "larger_calls_free": {"call_seconds": {k: v if k == "1" else 5e-324 for k, v in calls.items()},
                                        "solver_seconds": {k: 0.0 for k in entry["solver_seconds"]}}}[damage]
    with open(path, "w") as f:
        json.dump(cache, f)
    for name, window in (("b", "auto"), ("c", "4")):
        _, m = run(tmp_path / name, "--timesteps", "16", "--num_samples", "1", "--window_size", window)
        speed = m["speed"]
        assert math.isfinite(speed["speedup"]) and speed["sequential_seconds"] > 0, speed
    assert m["per_call_seconds"] > 0


def test_a_cached_curve_from_another_load_is_measured_again_and_never_makes_the_speedup(tmp_path, monkeypatch):
    """The cache holds what a run measured, under whatever load the machine had then. A curve 100x slower than the
    model is now (measured while the machine was busy) made a run at window 1, sequential sampling itself, report
    a speed-up of ~9x. Now every run times c(B) itself: window auto measures the curve again when the cached one
    is off by more than planner.STALE, and the speed-up rests on this run's timing with any window."""
    from paratAA.planner import STALE
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    flags = ["--timesteps", "16", "--num_samples", "1"]
    run(tmp_path / "a", *flags, "--window_size", "auto")
    path = tmp_path / "cache" / "cost_curves.json"
    with open(path) as f:
        cache = json.load(f)
    (key, entry), = cache.items()
    slow = {k: 100 * v for k, v in entry["call_seconds"].items()}
    with open(path, "w") as f:
        json.dump({key: {**entry, "call_seconds": slow}}, f)
    _, auto = run(tmp_path / "b", *flags, "--window_size", "auto")
    plan = auto["plan"]
    assert plan["measured"] and plan["checked_call_seconds"] < slow["1"] / STALE, plan
    # the run's sequential estimate takes c(B) of the curves measured again, as the plan's predictions do, not the
    # one check that found the cache stale (a moment's load made them 7x apart, 0.15 s against 1.12 s)
    assert auto["per_call_seconds"] == plan["call_seconds"]["1"]
    assert plan["predicted_sequential_seconds"] == pytest.approx(16 * auto["per_call_seconds"])
    with open(path) as f:  # the entry measured again replaces the stale one
        assert json.load(f)[key]["call_seconds"]["1"] < slow["1"] / STALE
    with open(path, "w") as f:
        json.dump({key: {**entry, "call_seconds": slow}}, f)
    _, seq = run(tmp_path / "c", *flags, "--window_size", "1")
    # about 1 (sequential sampling against itself); the stale curve gave about 100
    assert seq["per_call_seconds"] < slow["1"] / STALE and seq["speed"]["speedup"] < 10, seq["speed"]


def test_a_cached_curve_is_checked_with_one_size_and_kept_when_it_holds():
    from paratAA import SolverConfig, dit_schedule, noise_from_seeds
    from paratAA.planner import plan_window
    schedule, noise = dit_schedule(16), noise_from_seeds([0], 16, (4, 4, 4))
    sizes = []

    def model(x, t, c):
        sizes.append(x.shape[0])
        time.sleep(0.01)
        return torch.zeros_like(x)
    curve = {"call_seconds": {"1": 0.01, "4": 0.012, "16": 0.02}, "solver_seconds": {"1": 0.0, "16": 0.001},
             "steps": 16}
    cache = {"k": dict(curve)}
    plan = plan_window(model, schedule, noise, None, SolverConfig(), Sharding(), torch.float32, solve=solve,
                       cache=cache, key="k")
    # one size timed (a warm-up and two timed calls), the cached curve kept: within STALE of the sleep
    assert not plan.measured and set(sizes) == {1} and plan.checked_call_seconds >= 0.01
    assert cache == {"k": curve}
    sizes.clear()
    cache = {"k": {**curve, "call_seconds": {"1": 1.0, "4": 1.2, "16": 2.0}}}  # 100x: another load
    plan = plan_window(model, schedule, noise, None, SolverConfig(), Sharding(), torch.float32, solve=solve,
                       cache=cache, key="k")
    assert plan.measured and max(sizes) > 1 and cache["k"]["call_seconds"]["1"] < 0.1


def test_a_process_without_the_cached_curve_makes_every_process_measure():
    """Only the main process writes the cache: on two nodes, each with its own cache folder, the second run found
    the curve on one process and not on the other. The one without it measured; the one with it read its curve with
    no fresh timing and failed ("unsupported operand type(s) for /: 'NoneType' and 'float'"). Here the other
    process is played by the first collective's answer: some process has no entry."""
    from paratAA import SolverConfig, dit_schedule, noise_from_seeds
    from paratAA.planner import plan_window
    schedule, noise = dit_schedule(16), noise_from_seeds([0], 16, (4, 4, 4))
    sizes = []

    def model(x, t, c):
        sizes.append(x.shape[0])
        return torch.zeros_like(x)

    class AnotherHasNoEntry(Sharding):
        asked = 0

        def min(self, value):  # the first question is whether every process has the entry
            self.asked += 1
            return 0.0 if self.asked == 1 else super().min(value)
    cache = {"k": {"call_seconds": {"1": 0.01, "4": 0.012, "16": 0.02}, "solver_seconds": {"1": 0.0, "16": 0.001},
                   "steps": 16}}
    plan = plan_window(model, schedule, noise, None, SolverConfig(), AnotherHasNoEntry(), torch.float32,
                       solve=solve, cache=cache, key="k")
    assert plan.measured and max(sizes) > 1


def test_a_cached_curve_is_read_never_above_a_larger_size():
    """A cache written before measure_call_seconds lowered a call's time to a larger size's (an H200 timed one SD
    state at 49.6 ms and two at 29.4 ms) is read as that function now leaves a curve."""
    from paratAA import SolverConfig, dit_schedule, noise_from_seeds
    from paratAA.planner import plan_window
    schedule, noise = dit_schedule(16), noise_from_seeds([0], 16, (4, 4, 4))

    def model(x, t, c):
        time.sleep(0.01)
        return torch.zeros_like(x)
    cache = {"k": {"call_seconds": {"1": 0.014, "4": 0.011, "16": 0.02}, "solver_seconds": {"1": 0.0, "16": 0.001},
                   "steps": 16}}
    plan = plan_window(model, schedule, noise, None, SolverConfig(), Sharding(), torch.float32, solve=solve,
                       cache=cache, key="k")
    assert not plan.measured and plan.call_seconds == {1: 0.011, 4: 0.011, 16: 0.02}


def test_two_runs_saving_the_cache_together_keep_both_entries(tmp_path, monkeypatch):
    """Each run wrote back the cache it had loaded plus its own entry: of two runs started together, the last to
    save dropped the other's. And a save that fails (the cache file is a folder) leaves no temporary file."""
    from runner import planning
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / "cost_curves.json"
    other = {"call_seconds": {"1": 0.01}, "solver_seconds": {"1": 0.0}, "max_inputs": None}
    real = planning.plan_window

    def another_run_saves_meanwhile(*args, **kwargs):  # after this run loaded the file, before it saves
        os.makedirs(path.parent, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"another run's key": other}, f)
        return real(*args, **kwargs)
    monkeypatch.setattr(planning, "plan_window", another_run_saves_meanwhile)
    run(tmp_path / "a", "--timesteps", "8", "--num_samples", "1", "--window_size", "auto")
    with open(path) as f:
        cache = json.load(f)
    assert len(cache) == 2 and cache["another run's key"] == other
    monkeypatch.setattr(planning, "plan_window", real)
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "folder"))
    os.makedirs(tmp_path / "folder" / "cost_curves.json")
    run(tmp_path / "b", "--timesteps", "8", "--num_samples", "1", "--window_size", "auto")
    assert os.listdir(tmp_path / "folder") == ["cost_curves.json"]


def test_the_cache_key_names_the_model_path():
    """A diffusers DiT folder's bundle names no architecture (its model is "diffusers DiTPipeline"): a folder of 8
    transformer layers read the curve measured for one of 2."""
    from types import SimpleNamespace
    from runner.planning import cache_key
    bundle = SimpleNamespace(info={"model": "diffusers DiTPipeline", "scheduler": {}}, latent=(4, 4, 4),
                             schedule=SimpleNamespace(num_steps=8))
    config, session = SolverConfig(), SimpleNamespace(device=torch.device("cpu"), model_dtype=torch.float32,
                                                      world_size=1)
    key = lambda path: cache_key(bundle, SimpleNamespace(model_path=path, cfg_scale=4.0), config, session, 1)  # noqa
    assert key("dit_small") != key("dit_big")
    assert key("dit_small") == key(os.path.abspath("dit_small"))  # the same folder however it is written


def test_the_prediction_of_a_smaller_last_batch_is_at_its_own_size(tmp_path, monkeypatch):
    """--num_samples 3 --batch_size 2 at window auto: the predicted time was the first batch's times the batches,
    as if the last one, of one sample, cost a call of two."""
    from paratAA import planner
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    # a call of n inputs costs 0.01 n (window 1 wins), the solver's work nothing
    monkeypatch.setattr(planner, "measure_call_seconds", lambda eps_fn, schedule, noise, cond, sharding, dtype,
                        windows: {noise.shape[0] * w: 0.01 * noise.shape[0] * w for w in windows})
    monkeypatch.setattr(planner, "measure_solver_seconds", lambda *a: {w: 0.0 for w in a[-2]})
    from runner import planning  # the last batch's call of one sample, timed for the sequential estimate: the same
    monkeypatch.setattr(planning, "measure_call_seconds",
                        lambda eps_fn, schedule, noise, *rest: {noise.shape[0]: 0.01 * noise.shape[0]})
    _, m = run(tmp_path / "a", "--timesteps", "10", "--num_samples", "3", "--batch_size", "2", "--window_size", "auto")
    assert m["plan"]["window"] == 1 and m["plan"]["predicted_seconds"] == pytest.approx(10 * 0.02)
    assert m["speed"]["predicted_sampling_seconds"] == pytest.approx(10 * 0.02 + 10 * 0.01)


def test_a_smaller_last_batch_is_predicted_at_its_timed_call(tmp_path, monkeypatch):
    """Below the curve's smallest call (B states) the curve is a line to zero: a model whose calls cost 0.01 s plus
    0.005 s a state had the last batch's call of 1 predicted at 0.01 s, where the run had timed it at 0.015 s for
    its sequential estimate. That timing is used (on this CPU: 1.5 ms predicted, 1.8-2.3 ms timed)."""
    from paratAA import planner
    from runner import planning
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    cost = lambda n: 0.01 + 0.005 * n  # noqa: E731
    monkeypatch.setattr(planner, "measure_call_seconds", lambda eps_fn, schedule, noise, cond, sharding, dtype,
                        windows: {noise.shape[0] * w: cost(noise.shape[0] * w) for w in windows})
    monkeypatch.setattr(planner, "measure_solver_seconds", lambda *a: {w: 0.0 for w in a[-2]})
    monkeypatch.setattr(planning, "measure_call_seconds",
                        lambda eps_fn, schedule, noise, *rest: {noise.shape[0]: cost(noise.shape[0])})
    _, m = run(tmp_path / "a", "--timesteps", "10", "--num_samples", "3", "--batch_size", "2", "--window_size", "auto")
    assert m["plan"]["window"] == 1 and m["last_batch_per_call_seconds"]["seconds"] == pytest.approx(0.015)
    assert m["speed"]["predicted_sampling_seconds"] == pytest.approx(10 * cost(2) + 10 * cost(1))


def test_grid_row_labels_are_one_readable_line():
    """A prompt's newline is a space, a long one ends in "...", and the font draws a space and accented letters
    (Pillow's default drew "a handwritten digit seven" as "...digitseven" and "é" as a box)."""
    from runner.writer import LABEL_CHARS, _font, _row_label
    assert _row_label(3, {"prompt": "a handwritten\ndigit\tseven"}) == "3: a handwritten digit seven"
    long = _row_label(0, {"prompt": "x " * 100})
    assert len(long) == LABEL_CHARS and long.endswith("...")
    assert _row_label(1, {"class_label": 7}) == "1: class 7"
    font = _font()
    assert font.getlength("digit seven") - font.getlength("digitseven") >= 3
    box = font.getmask("\uffff").getbbox()  # a character no font has: what a missing glyph draws
    assert font.getmask("é").getbbox() != box


def test_a_smaller_last_batch_is_estimated_at_its_own_size(tmp_path, monkeypatch):
    """--num_samples 3 --batch_size 2: the last batch holds one sample, and sequential sampling of it costs T calls
    of one sample, not of two (on a CPU a call of 16 samples cost 6x one of 1: the estimate, and so the speed-up, of
    --num_samples 17 --batch_size 16 came out about 1.7x too high)."""
    from runner import planning
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(planning, "measure_call_seconds",
                        lambda eps_fn, schedule, noise, *rest: {noise.shape[0]: 0.01 * noise.shape[0]})
    _, m = run(tmp_path / "a", "--timesteps", "10", "--num_samples", "3", "--batch_size", "2", "--window_size", "4")
    assert m["per_call_seconds"] == pytest.approx(0.02)
    assert m["speed"]["sequential_seconds"] == pytest.approx(10 * 0.02 + 10 * 0.01)



def _out_of_memory_above(model, limit):
    """model, failing as CUDA does (torch.OutOfMemoryError) on a call of more than limit inputs."""
    def eps_fn(x, t, c):
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: tried {x.shape[0]} inputs")
        return model(x, t, c)
    return eps_fn


def test_an_auto_window_is_chosen_among_the_calls_that_fit_in_memory():
    """A GPU with less memory than the largest window's call needs: measuring the cost curve ended the run with the
    out-of-memory error where a smaller window would have sampled. Now the window is chosen among the sizes that
    fit, the plan says the largest, and a cache entry keeps it."""
    from paratAA.planner import plan_window
    model, schedule, noise = gmm_problem(20, batch=2)
    small = _out_of_memory_above(model, 8)
    free = lambda x, t, c: model(x, t, c)  # noqa: E731
    cache, key = {}, "gmm"
    config = SolverConfig(window_size="auto")
    plan = plan_window(small, schedule, noise, None, config, Sharding(), torch.float64, solve=solve, cache=cache,
                       key=key)
    assert plan.max_inputs == 8 and plan.window <= 4 and max(plan.call_seconds) == 8
    assert cache[key]["max_inputs"] == 8
    again = plan_window(small, schedule, noise, None, config, Sharding(), torch.float64, solve=solve, cache=cache,
                        key=key)
    assert not again.measured and again.max_inputs == 8 and again.window <= 4
    assert plan_window(free, schedule, noise, None, config, Sharding(), torch.float64, solve=solve).max_inputs is None
    out = solve(small, schedule, noise, window_size="auto", tol1=0, tol2=0, model_dtype=torch.float64)
    assert torch.allclose(out.samples, sample_sequential(model, schedule, noise, model_dtype=torch.float64)[:, 0],
                          atol=1e-10, rtol=0)
    with pytest.raises(torch.OutOfMemoryError):  # one state per sample must fit: sequential sampling needs them
        plan_window(_out_of_memory_above(model, 1), schedule, noise, None, config, Sharding(), torch.float64,
                    solve=solve)


def test_a_call_size_out_of_memory_only_at_its_timed_repeats_does_not_fit():
    """The warm-up call of a size fit and a timed repeat ran out of memory (the allocator fragmented): its NaN
    answer, made without the model's work, was timed as the call, so the cost curve (c(B) too, a smaller call never
    costing more) said near nothing, the window was chosen at that size and solve ran out of memory."""
    from paratAA.planner import plan_window
    model, schedule, noise = gmm_problem(20, batch=2)
    seen = {}

    def eps_fn(x, t, c):
        n = seen[x.shape[0]] = seen.get(x.shape[0], 0) + 1
        if x.shape[0] > 8 and n > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        time.sleep(0.003)  # batching nearly free, as on a GPU: the curve is measured up to the size that fails
        return model(x, t, c)
    plan = plan_window(eps_fn, schedule, noise, None, SolverConfig(window_size="auto"), Sharding(), torch.float64,
                       solve=solve)
    assert plan.max_inputs == 8 and max(plan.call_seconds) == 8 and plan.window <= 4
    assert plan.call_seconds[2] > 0.002


def test_each_size_is_timed_again_after_the_largest_call_as_the_run_meets_it():
    """On a CPU a call larger than any before it pays for memory the allocator has not kept yet, at every repeat
    (the embedded text-to-image model: 32 states 19-22 ms timed up the sizes, 14 ms after a larger call, as in the
    run), and the planner chose window 16 where 32 was faster. A model costing that: every size but the largest is
    timed at its steady cost."""
    _, schedule, noise = gmm_problem(40)
    largest = [0]

    def eps_fn(x, t, c):
        n = x.shape[0]
        time.sleep(0.002 + (0.03 if n >= largest[0] else 0.0))  # the largest call yet grows the heap
        largest[0] = max(largest[0], n)
        return torch.zeros_like(x)
    calls = measure_call_seconds(eps_fn, schedule, noise, None, Sharding(), torch.float64, [1, 2, 4, 8])
    assert sorted(calls) == [1, 2, 4, 8] and calls[8] > 0.03
    assert all(calls[n] < 0.02 for n in (1, 2, 4))


def test_a_size_that_fails_when_timed_again_limits_the_windows():
    """A size that fit up the sizes and not when timed again (down them, after the largest call): it and every
    larger size count as not fitting, and the window is chosen below."""
    from paratAA.planner import plan_window
    model, schedule, noise = gmm_problem(20)
    seen = {}

    def eps_fn(x, t, c):
        n = seen[x.shape[0]] = seen.get(x.shape[0], 0) + 1
        time.sleep(0.002)
        if x.shape[0] == 8 and n > 2:  # the third call of 8 inputs: the first timed again
            return torch.full_like(x, math.nan)
        return model(x, t, c)
    calls = measure_call_seconds(eps_fn, schedule, noise, None, Sharding(), torch.float64, [1, 2, 4, 8, 16])
    assert math.isinf(calls[8]) and math.isinf(calls[16]) and all(math.isfinite(calls[n]) for n in (1, 2, 4))
    seen.clear()
    plan = plan_window(eps_fn, schedule, noise, None, SolverConfig(window_size="auto"), Sharding(), torch.float64,
                       solve=solve)
    assert plan.max_inputs == 4 and plan.failed_inputs == 8 and plan.window <= 4


def test_cpu_processes_keep_freed_memory():
    """runner.launch.keep_freed_memory sets glibc's top pad (Linux): the heap then grows by the pad at once. Run in
    a process of its own, as the setting is process-wide."""
    import subprocess
    import sys
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            raise ValueError
    except (ValueError, OSError, AttributeError):
        pytest.skip("glibc's mallopt: Linux only")
    probe = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from runner.launch import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
if sys.argv[2] == "1":
    assert keep_freed_memory(64 << 20)
before = libc.mallinfo2().arena
blocks = [libc.malloc(16 << 10) for _ in range(2048)]  # 32 MiB in blocks below the mmap threshold: from the heap
print((libc.mallinfo2().arena - before) >> 20)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    growth = [int(subprocess.run([sys.executable, "-c", probe, root, on], capture_output=True, text=True,
                                 check=True).stdout) for on in "01"]  # MiB the heap grew by: without, with the pad
    assert growth[0] <= 40 and growth[1] >= 60  # the first growth takes the pad with it


def test_a_cpu_session_keeps_freed_memory(monkeypatch):
    from runner import launch
    kept = []
    monkeypatch.setattr(launch, "keep_freed_memory", lambda: kept.append(True))
    session = launch.Session()
    assert session.device.type == "cpu" and kept == [True]


def _planning_run(eps_fn, T, B=1):
    """What runner.planning.plan_run takes, for a model given as a function (no script, no writer)."""
    from types import SimpleNamespace
    from paratAA import dit_schedule, noise_from_seeds
    bundle = SimpleNamespace(eps_fn=eps_fn, schedule=dit_schedule(T), info={"model": "test"}, latent=(4, 4, 4))
    args = SimpleNamespace(model_path=None, cfg_scale=1.0, compare_sequential=False)
    session = SimpleNamespace(sharding=Sharding(), model_dtype=torch.float32, device=torch.device("cpu"),
                              world_size=1, is_main=True)
    return bundle, args, SolverConfig(window_size="auto"), session, noise_from_seeds(list(range(B)), T, (4, 4, 4))


def test_a_cached_curve_predicts_in_this_runs_time(tmp_path, monkeypatch):
    """A run that read the cache times c(B) afresh and estimates sequential sampling from it, but the plan predicted
    from the cached c(B): one metrics.json said sequential sampling takes T c(B) twice, with two c(B) up to
    planner.STALE apart (here 2x). The plan's times now follow the fresh c(B); its window and speed-up are the
    cached curves'."""
    from paratAA import planner
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    # a call of B w inputs costs 0.01 (1 + w / 8): batching nearly free, so a window above 1 wins
    monkeypatch.setattr(planner, "measure_call_seconds", lambda eps_fn, schedule, noise, cond, sharding, dtype,
                        windows: {noise.shape[0] * w: 0.01 * (1 + w / 8) for w in windows})
    monkeypatch.setattr(planner, "measure_solver_seconds", lambda *a: {w: 0.0 for w in a[-2]})
    flags = ["--timesteps", "16", "--num_samples", "1", "--window_size", "auto"]
    _, first = run(tmp_path / "a", *flags)
    path = tmp_path / "cache" / "cost_curves.json"
    with open(path) as f:
        cache = json.load(f)
    (key, entry), = cache.items()
    with open(path, "w") as f:  # measured under twice the load: within STALE, so read
        json.dump({key: {**entry, "call_seconds": {k: 2 * v for k, v in entry["call_seconds"].items()}}}, f)
    _, m = run(tmp_path / "b", *flags)
    plan, speed = m["plan"], m["speed"]
    assert not plan["measured"] and plan["predicted_sequential_seconds"] == pytest.approx(speed["sequential_seconds"])
    assert speed["sequential_seconds"] == pytest.approx(16 * m["per_call_seconds"])
    assert speed["predicted_sampling_seconds"] == pytest.approx(plan["predicted_seconds"])  # one batch: the plan's
    # the cached curve twice the measured one, the solver's work nothing: the same window and speed-up
    assert plan["window"] == first["plan"]["window"] > 1 and plan["curve_scale"] == pytest.approx(0.5)
    assert plan["predicted_speedup"] == pytest.approx(first["plan"]["predicted_speedup"])
    # the scale multiplies every window's time alike: the window is the one the curves choose, whatever it is
    idle, solver = {n: 0.01 + 1e-4 * n for n in (1, 2, 4, 8, 16)}, {1: 1e-4, 16: 1e-3}
    plain, scaled = choose(16, 1, idle, solver), choose(16, 1, idle, solver, scale=0.37)
    assert scaled.window == plain.window and scaled.predict(1) == pytest.approx(scaled.predicted_seconds)
    assert scaled.predicted_seconds == pytest.approx(0.37 * plain.predicted_seconds)


def test_a_warm_starts_curve_is_not_read_by_a_longer_solve(tmp_path, monkeypatch):
    """A warm start (parallel_sd_winit.py's prompt2) measures windows up to its variation_steps only, and cached the
    curve under the key of the whole T: a solve of all T steps then read it and chose among windows above any size
    measured. A cached curve is now read only by a solve of no more steps than it was measured for."""
    from paratAA import planner
    from runner import planning
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(planner, "measure_call_seconds", lambda eps_fn, schedule, noise, cond, sharding, dtype,
                        windows: {noise.shape[0] * w: 0.01 for w in windows})
    monkeypatch.setattr(planner, "measure_solver_seconds", lambda *a: {w: 0.0 for w in a[-2]})
    problem = _planning_run(lambda x, t, c: torch.zeros_like(x), 16)
    _, warm, _ = planning.plan_run(*problem, None, steps=4)
    assert warm.measured and max(warm.call_seconds) == 4
    _, full, _ = planning.plan_run(*problem, None)
    assert full.measured and max(full.call_seconds) == 16
    _, again, _ = planning.plan_run(*problem, None, steps=4)  # the whole T's curve covers a warm start's
    assert not again.measured and max(again.call_seconds) == 16


def test_a_call_size_with_a_non_finite_output_is_said(tmp_path, monkeypatch, capsys):
    """A model whose output is NaN only at large batches is, to the planner, a call that did not fit in memory (it
    cannot tell the model's NaN from an out-of-memory shard's): max_inputs, as before, but said on the terminal with
    the size that failed, where before the windows above were left out silently."""
    from runner import planning
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "cache"))

    def eps_fn(x, t, c):
        time.sleep(0.002)  # batching nearly free: the curve is measured up to the size that fails
        return torch.full_like(x, math.nan) if x.shape[0] > 4 else torch.zeros_like(x)
    problem = _planning_run(eps_fn, 16)
    for measured in (True, False):  # measured, then read from the cache
        _, plan, _ = planning.plan_run(*problem, None)
        assert plan.measured == measured and plan.max_inputs == 4 and plan.window <= 4
        err = capsys.readouterr().err
        assert err.count("note:") == 1 and "a call of 8 inputs gave a non-finite output" in err, err
        assert "windows above 4 (more than 4 inputs per call" in err


def test_a_cache_file_that_is_a_fifo_is_not_waited_on(tmp_path):
    """PARATAA_CACHE naming a folder whose cost_curves.json is a FIFO: reading it waited for a writer forever, with
    the run folder already saying "running". It is read as no cache (the curves are measured)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "cache").mkdir()
    os.mkfifo(tmp_path / "cache" / "cost_curves.json")
    env = {**os.environ, "PARATAA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(root, "parallel_dit.py"), "--timesteps", "8", "--num_samples",
                           "1", "--output_path", str(tmp_path / "out")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = os.listdir(tmp_path / "out")
    assert read_metrics(str(tmp_path / "out" / run_dir))["plan"]["measured"]


def test_a_cache_that_cannot_be_written_is_said(tmp_path, monkeypatch, capsys):
    """PARATAA_CACHE naming a file (not a folder): nothing was cached, and nothing said, run after run."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("PARATAA_CACHE", str(tmp_path / "a_file"))
    run(tmp_path / "a", "--timesteps", "8", "--num_samples", "1", "--window_size", "auto")
    err = capsys.readouterr().err
    assert "not cached" in err and "a_file" in err and "PARATAA_CACHE" in err, err


def test_record_x0_must_be_a_bool():
    eps, schedule, noise = gmm_problem(6)
    with pytest.raises(TypeError, match="record_x0 must be True or False"):
        solve(eps, schedule, noise, record_x0="no")  # a truth test read "no" as yes


def test_the_gpu_estimates_read_a_curve_as_the_planner_does(tmp_path):
    """gpu_estimate.py on the H200's report, whose planner timed one SD state at 49.6 ms and two at 29.4 ms and
    measured to 32 inputs only: sequential sampling was charged 100 calls at 49.6 ms (speed-ups above T / K, 2.81x
    at window 4 where K = 41), and every window above 32 the call of 32 (DiT-XL/2 at window 100 3.6x, where the
    report's own table gives about 1.2x). Now no speed-up beats T / K, and a call grows past the largest size."""
    from benchmarks import gpu_estimate
    results = os.path.join(ROOT, "benchmarks", "results")
    gpu_estimate.main(gpu_estimate.parse_args([
        "--gpu", os.path.join(results, "gpu_h200_s19.json"), "--dit", os.path.join(results, "dit.json"),
        "--sd", os.path.join(results, "sd.json"), "--out", str(tmp_path / "estimate.json")]))
    with open(tmp_path / "estimate.json") as f:
        report = json.load(f)
    for name, model in report["models"].items():
        for W, r in model["windows"].items():
            bound = model["T"] / r["iterations"]
            assert r["speedup"] <= bound and r["speedup_8_gpus_upper_bound"] <= bound, (name, W, r)
    for name, model in report["models"].items():
        rows = {int(w): r for w, r in model["windows"].items()}
        solver = report["solver_seconds"][name]
        call = {W: r["paratAA_seconds"] / r["iterations"] - solver for W, r in rows.items()}
        assert call[100] > call[50] > call[32], (name, call)


def test_one_state_is_called_in_a_burst_before_the_curve_is_timed():
    """The first calls of a fresh process ran slow (the embedded DiT on one CPU thread: c(1) 2.0-2.1 ms where
    sequential sampling takes 1.7-1.9 ms per step), and with c(1) high the planner took window 7 (0.84x) over window
    1. A model whose first 8 calls at each size are slow: c(1) is timed after the burst, as sequential sampling meets
    it over T steps."""
    _, schedule, noise = gmm_problem(8)
    seen = {}

    def model(x, t, cond):
        seen[x.shape[0]] = seen.get(x.shape[0], 0) + 1
        time.sleep(0.02 if seen[x.shape[0]] <= 8 else 0.002)
        return torch.zeros_like(x)
    calls = measure_call_seconds(model, schedule, noise, None, Sharding(), torch.float64, [1, 2, 4])
    assert calls[1] < 0.01 <= calls[2], calls
