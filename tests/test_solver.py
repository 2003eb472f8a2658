"""The solver's properties (docs/ALGORITHM.md, section 5) on the closed-form Gaussian-mixture model (float64,
exact noise prediction): exactness, the T bound, batches, warm starts, faults, configuration errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from paratAA import NonFiniteModelOutput, SolverConfig, dit_schedule, sample_sequential, solve
from tests.conftest import gmm_problem

T_EXACT = 12


@pytest.mark.parametrize("variant", ["picard", "ddim", "paper"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("window", [1, 7, T_EXACT])
@pytest.mark.parametrize("memory", [1, 2, 4])
@pytest.mark.parametrize("order", [1, 3, T_EXACT])
def test_tolerance_zero_equals_sequential(order, memory, window, eta, variant):
    """Both forms, and the paper mode (the reference's start of new states, TAA columns, update of passed states)."""
    model, schedule, noise = gmm_problem(T_EXACT, batch=2, eta=eta)
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    config = SolverConfig.paper() if variant == "paper" else SolverConfig(equations=variant)
    out = solve(model, schedule, noise, config=config, window_size=window, order=order, memory_size=memory, tol1=0,
                tol2=0, model_dtype=torch.float64)
    assert all(out.converged) and out.max_iterations <= T_EXACT
    assert torch.allclose(out.trajectory, ref, atol=1e-12, rtol=0), float((out.trajectory - ref).abs().max())


def test_the_paper_mode_keeps_a_window_above_T():
    """The reference's SD script runs window 100 at T = 50: a window above T starts every state at x_T in the first
    iteration, x_0 included, where at window T x_0 starts at 0 and is overwritten by x_1 in the second. Capping it
    at T (as the default settings do: the same states are evaluated) left x_0's iterates up to 7.6e-3 off the
    reference's on the embedded text-to-image model from iteration 2 (a harness outside the repository running the
    reference); the boundaries and the result were the same, and are."""
    assert SolverConfig.paper(window_size=100).resolve(50).window_size == 100
    assert SolverConfig.paper(window_size=100).resolve(50).order == 50
    assert SolverConfig(window_size=100).resolve(50).window_size == 50
    model, schedule, noise = gmm_problem(20, batch=2)
    runs = [solve(model, schedule, noise, config=SolverConfig.paper(window_size=w), record_x0=True,
                  model_dtype=torch.float64) for w in (20, 100)]
    at_T, above = runs
    assert at_T.iterations == above.iterations and at_T.config.window_size == 20 and above.config.window_size == 100
    assert all(a.boundary == b.boundary for a, b in zip(at_T.history, above.history))
    assert all(torch.allclose(a.x0[1], b.x0[1], atol=1e-12, rtol=0) for a, b in zip(at_T.history, above.history))
    assert max(float((a.x0[2] - b.x0[2]).abs().max()) for a, b in zip(at_T.history, above.history)) > 1e-6
    assert torch.allclose(at_T.samples, above.samples, atol=1e-8, rtol=0)


@pytest.mark.parametrize("window", [1, 6, 20])
def test_the_paper_mode_counts_max_steps_as_the_reference(window):
    """The reference keeps samples while it has fewer than max_steps, the initial state first (its example runs,
    --max_steps 10, saved step_0 ... step_9): max_steps - 1 model calls. The paper mode counts so, on the same
    iterates as an uncapped run; the default counts model calls."""
    model, schedule, noise = gmm_problem(20, batch=2)
    full = solve(model, schedule, noise, config=SolverConfig.paper(window_size=window), record_x0=True,
                 model_dtype=torch.float64)
    with pytest.raises(ValueError, match="max_steps must be at least 2 with reference_quirks"):
        SolverConfig.paper(window_size=window, max_steps=1)  # no model call at all
    for k in (2, 3, 6):
        capped = solve(model, schedule, noise, config=SolverConfig.paper(window_size=window, max_steps=k),
                       record_x0=True, model_dtype=torch.float64)
        assert capped.iterations == [k - 1] * 2 and not any(capped.converged)
        for h, h_full in zip(capped.history, full.history):
            assert len(h.x0) == k  # the reference's saved steps
            assert all(torch.equal(a, b) for a, b in zip(h.x0, h_full.x0[:k]))
        plain = solve(model, schedule, noise, window_size=window, max_steps=k, tol1=0, tol2=0,
                      model_dtype=torch.float64)
        assert plain.iterations == [k] * 2


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 30), window=st.integers(1, 34), order=st.integers(1, 34), memory=st.integers(1, 5),
       tol=st.sampled_from([0.0, 1e-6, 1e-3, 1e-1, 0.9]), eta=st.sampled_from([0.0, 0.5, 1.0]),
       seed=st.integers(0, 3), equations=st.sampled_from(["picard", "ddim"]), quirks=st.booleans(),
       init=st.sampled_from(["ddim", "copy"]))
def test_never_more_than_T_iterations(T, window, order, memory, tol, eta, seed, equations, quirks, init):
    model, schedule, noise = gmm_problem(T, batch=2, eta=eta, seed=seed, latent=(2, 4, 4))
    out = solve(model, schedule, noise, window_size=window, order=order, memory_size=memory, tol1=tol, tol2=tol,
                equations=equations, reference_quirks=quirks, model_dtype=torch.float64,
                # with reference_quirks an explicit init_states ddim is refused (it would have no effect)
                init_states="copy" if quirks else init)
    assert all(out.converged)
    assert out.max_iterations <= T
    for h in out.history:  # the boundary falls every iteration and never skips the window
        assert all(b1 < b0 for b0, b1 in zip([T] + h.boundary, h.boundary))
        assert h.boundary[-1] == 0


@pytest.mark.parametrize("equations", ["picard", "ddim"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_fixed_point_moves_one_level_per_iteration(eta, equations):
    T = 16
    model, schedule, noise = gmm_problem(T, eta=eta)
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    for k in range(1, T + 1):
        out = solve(model, schedule, noise, window_size=T, order=1, memory_size=1, tol1=0, tol2=0, max_steps=k,
                    equations=equations, model_dtype=torch.float64)
        exact = (out.trajectory[0] - ref[0]).flatten(1).abs().max(1).values <= 1e-12   # [T+1]
        assert exact[T - k:].all(), f"after {k} iterations the {k} noisiest steps must be exact"
        if k < T:  # and no more: the next state down still waits for its input
            assert not exact[T - k - 1]


@pytest.mark.parametrize("order", [1, 2, 5, 9])
@pytest.mark.parametrize("equations", ["picard", "ddim"])
def test_order_k_residual_matches_its_definition(order, equations):
    # the vectorised residual against equation (2) / the Picard sum written out state by state
    from paratAA.equations import OrderKEquations
    T, lo, F = 12, 2, 11
    _, schedule, _ = gmm_problem(T)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(T + 1, 5, generator=g, dtype=torch.float64), torch.randn(F - lo, 5, generator=g,
                                                                                 dtype=torch.float64)
    a = schedule.a
    r1 = a[lo:F, None] * x[lo + 1:F + 1] + e - x[lo:F]
    R = OrderKEquations(schedule, order, equations).residual(x, e, r1, lo, F)
    for s in range(lo, F):
        u = min(s + order, F)
        if equations == "ddim":  # x_s = P x_u + sum P e
            rhs, weight = torch.zeros(5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
            for r in range(s, u):
                rhs += weight * e[r - lo]
                weight = weight * a[r]
            rhs += weight * x[u]
        else:  # x_s = x_u + sum of the drifts step_r(x_{r+1}) - x_{r+1}
            rhs = x[u] + sum(a[r] * x[r + 1] + e[r - lo] - x[r + 1] for r in range(s, u))
        assert torch.allclose(R[s - lo], rhs - x[s], atol=1e-12, rtol=0), (s, order)


@pytest.mark.parametrize("conditioned", [False, True])
def test_batch_equals_separate_solves(conditioned):
    B, T = 4, 30
    model, schedule, noise = gmm_problem(T, batch=B, eta=0.3, seed=2)  # seed 2: iterations 14, 10, 10, 6
    # conditioned: each sample restricted to one mixture component (a linear model, so all converge together)
    cond = torch.tensor([3, 1, 4, 1]) if conditioned else None
    # the defaults (stop rule included): the unconditioned samples stop at different iterations here
    together = solve(model, schedule, noise, cond, model_dtype=torch.float64)
    calls = model.calls
    assert calls == together.max_iterations  # one batched model call per iteration for all samples
    for b in range(B):
        alone = solve(model, schedule, noise[b:b + 1], cond[b:b + 1] if conditioned else None,
                      model_dtype=torch.float64)
        assert alone.iterations[0] == together.iterations[b]
        assert alone.evaluations[0] == together.evaluations[b]
        assert alone.history[0].boundary == together.history[b].boundary
        assert torch.allclose(alone.trajectory[0], together.trajectory[b], atol=1e-12, rtol=0)
    if not conditioned:
        assert len(set(together.iterations)) > 1, "samples should converge at different iterations here"


@pytest.mark.parametrize("window", [4, 7])
def test_slide_test_is_a_per_state_tolerance_until_the_window_reaches_x0(window):
    """While the window is short of x_0 a state passes at slide_tol T / (100 W): the run is the one with that
    per-state tolerance, iterate for iterate, until the first iteration whose window reaches x_0."""
    T, slide_tol, tol1 = 40, 0.2, 1e-4
    model, schedule, noise = gmm_problem(T, batch=2, eta=0.3)
    cap = slide_tol * T / (100 * window)
    a = solve(model, schedule, noise, window_size=window, tol1=tol1, tol2=0, slide_tol=slide_tol, max_steps=1,
              model_dtype=torch.float64)
    b = solve(model, schedule, noise, window_size=window, tol1=cap, tol2=0, slide_tol=0, max_steps=1,
              model_dtype=torch.float64)
    k = 1
    while all(f > window for f in a.history[0].boundary[-1:] + a.history[1].boundary[-1:]):
        k += 1  # both samples' windows stay above x_0 in iteration k
        a = solve(model, schedule, noise, window_size=window, tol1=tol1, tol2=0, slide_tol=slide_tol, max_steps=k,
                  model_dtype=torch.float64)
        b = solve(model, schedule, noise, window_size=window, tol1=cap, tol2=0, slide_tol=0, max_steps=k,
                  model_dtype=torch.float64)
        assert [h.boundary for h in a.history] == [h.boundary for h in b.history]
        assert torch.equal(a.trajectory, b.trajectory)
    assert k > 2
    # and it loosens the test: without it the window slides more slowly
    slow = solve(model, schedule, noise, window_size=window, tol1=tol1, tol2=0, slide_tol=0, max_steps=k,
                 model_dtype=torch.float64)
    assert min(a.history[0].boundary[-1], a.history[1].boundary[-1]) < min(h.boundary[-1] for h in slow.history)


def test_settle_on_an_exact_model_is_the_tighter_tolerance():
    """An exact model's residuals keep halving until they pass, so with the window at x_0 throughout (window T)
    the settled test is the plain test at settle x the tolerance, iterate for iterate."""
    T = 30
    model, schedule, noise = gmm_problem(T, batch=2, eta=0.3)
    kw = dict(window_size=T, tol2=0, stop_tol=0, model_dtype=torch.float64)
    settled = solve(model, schedule, noise, tol1=1e-3, settle=0.1, **kw)
    tight = solve(model, schedule, noise, tol1=1e-4, settle=1.0, **kw)
    plain = solve(model, schedule, noise, tol1=1e-3, settle=1.0, **kw)
    assert [h.boundary for h in settled.history] == [h.boundary for h in tight.history]
    assert torch.equal(settled.trajectory, tight.trajectory)
    assert [h.boundary for h in settled.history] != [h.boundary for h in plain.history]


def with_round_off_floor(model, scale, seed=5):
    """The model with Gaussian noise of std scale on every prediction: a stand-in for a GPU's round-off floor."""
    g = torch.Generator().manual_seed(seed)

    def noisy(x, t, cond=None):
        e = model(x, t)
        return e + scale * torch.randn(e.shape, generator=g, dtype=e.dtype)
    return noisy


def test_settle_passes_states_at_the_model_round_off_floor():
    """A model whose predictions carry noise (as TF32 convolutions do on a GPU) leaves residuals above settle x
    the tolerance that no iteration removes: such a state, no longer halving, passes at the plain tolerance. Held
    to the tighter test it would freeze one state per iteration (T iterations here)."""
    T = 30
    model, schedule, noise = gmm_problem(T, batch=2)
    noisy = with_round_off_floor(model, 1e-3)  # one noise stream for both runs
    kw = dict(window_size=T, tol1=1e-3, tol2=0, stop_tol=0, model_dtype=torch.float64)
    settled = solve(noisy, schedule, noise, settle=0.1, **kw)
    plain = solve(noisy, schedule, noise, settle=1.0, **kw)
    assert all(settled.converged) and settled.max_iterations <= plain.max_iterations + 2 < T // 2


def test_block_test_changes_nothing_at_window_T_or_with_a_budget_never_reached():
    """The block test acts only while the window slides, and only where a block's residuals, each over its
    tolerance, sum to more than block_tol: at window T, or with a budget no block reaches, the run is the one with
    each state tested alone, iterate for iterate; a budget that binds slides the window more slowly."""
    T, W = 40, 8
    model, schedule, noise = gmm_problem(T, batch=2, eta=0.3)
    kw = dict(model_dtype=torch.float64)
    for window, budget in ((T, 1.0), (W, 1e9)):
        a = solve(model, schedule, noise, window_size=window, block_tol=budget, **kw)
        b = solve(model, schedule, noise, window_size=window, block_tol=0.0, **kw)
        assert [h.boundary for h in a.history] == [h.boundary for h in b.history]
        assert torch.equal(a.trajectory, b.trajectory)
    tight = solve(model, schedule, noise, window_size=W, block_tol=1e-6, **kw)
    alone = solve(model, schedule, noise, window_size=W, block_tol=0.0, **kw)
    assert all(tight.converged) and tight.max_iterations > alone.max_iterations
    # the guarantee holds whatever the budget: the boundary drops by at least one state per iteration
    for h in tight.history:
        assert all(a > b for a, b in zip([T] + h.boundary, h.boundary))


def test_block_test_leaves_out_states_at_the_model_round_off_floor():
    """Residuals at a model's noise floor do not point the same way, so they do not add up, and a state there
    cannot get below it: the block test counts only states still converging fast (residual down 8x since the
    previous iteration). Counting every state, this run takes 31 iterations instead of 24 (both tests: 24)."""
    T, W = 50, 8
    model, schedule, noise = gmm_problem(T, batch=2)
    runs = []
    for budget in (1.0, 0.0):
        runs.append(solve(with_round_off_floor(model, 5e-4), schedule, noise, window_size=W, tol1=1e-4, tol2=0, block_tol=budget,
                          model_dtype=torch.float64))
    default, alone = runs
    assert all(default.converged) and default.max_iterations <= alone.max_iterations + 1


def test_slide_test_is_off_once_the_window_reaches_x0():
    # at window = T the window reaches x_0 from the first iteration: slide_tol changes nothing
    T = 30
    model, schedule, noise = gmm_problem(T, batch=2, eta=0.3)
    runs = [solve(model, schedule, noise, slide_tol=v, model_dtype=torch.float64) for v in (0.0, 8e-3, 0.99)]
    for r in runs[1:]:
        assert r.iterations == runs[0].iterations and torch.equal(r.trajectory, runs[0].trajectory)
    # the largest slide tolerance (below 1) freezes faster than none while the window slides; once the window
    # reaches x_0 the per-state tolerance decides, and x_0's window takes more than one iteration
    W = 8
    loose = solve(model, schedule, noise, window_size=W, slide_tol=0.99, model_dtype=torch.float64)
    tight = solve(model, schedule, noise, window_size=W, model_dtype=torch.float64)
    for h, h0 in zip(loose.history, tight.history):
        sliding = [b for b in h.boundary if b > W]
        assert all(b <= b0 for b, b0 in zip(sliding, h0.boundary))
        assert len(h.boundary) - len(sliding) > 1  # x_0's window did not pass in one iteration
    assert loose.max_iterations < tight.max_iterations and all(loose.converged)


def test_warm_start_equals_sequential_from_that_level():
    T, V = 20, 8
    model, schedule, noise = gmm_problem(T, batch=2, eta=0.4)
    cond_a, cond_b = torch.tensor([0, 1]), torch.tensor([5, 6])
    traj_a = solve(model, schedule, noise, cond_a, tol1=0, tol2=0, model_dtype=torch.float64).trajectory
    ref_b = sample_sequential(model, schedule, noise, cond_b, init=traj_a, start=V, model_dtype=torch.float64)
    out = solve(model, schedule, noise, cond_b, init=traj_a, variation_steps=V, tol1=0, tol2=0,
                memory_size=3, model_dtype=torch.float64)
    assert out.max_iterations <= V
    assert torch.equal(out.trajectory[:, V:], traj_a[:, V:])  # the noisiest T - V states stay frozen
    assert torch.allclose(out.trajectory, ref_b, atol=1e-12, rtol=0)


def test_history_records_the_x0_estimate():
    T = 10
    model, schedule, noise = gmm_problem(T)
    out = solve(model, schedule, noise, window_size=4, record_x0=True, model_dtype=torch.float64)
    h = out.history[0]
    assert len(h.x0) == out.iterations[0] + 1
    assert torch.equal(h.x0[0], noise[0, T])               # before iteration 1: x_T copied down
    assert torch.equal(h.x0[-1], out.samples[0])
    # each entry is a snapshot: an early estimate is not the final sample (entries must not alias the state)
    assert not torch.equal(h.x0[1], out.samples[0])
    assert sum(h.evaluations) == out.evaluations[0] and max(h.evaluations) <= 4


@pytest.mark.parametrize("window", [1, 5, 10])
def test_a_module_with_parameters_is_sampled_without_autograd(window):
    """A model passed as it is, with gradients on (a plain nn.Module called from a user's script): its output
    requires grad, which the solver's in-place arithmetic refused before, and each iteration would otherwise have
    carried the autograd graph of all the previous ones. The result is the plain model's, without a graph; an
    eps_fn that needs gradients (guidance) still gets them by asking for them."""
    T = 10
    model, schedule, noise = gmm_problem(T, eta=0.5)
    gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def module(x, t, cond):
        return model(x, t, cond) * gain

    def guided(x, t, cond):
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            pull, = torch.autograd.grad((x * gain).square().sum(), x)
        return model(x.detach(), t, cond) + 1e-3 * pull

    plain = solve(model, schedule, noise, window_size=window, model_dtype=torch.float64)
    with torch.enable_grad():  # as in a user's script (a test run before may have turned it off in this process)
        out = solve(module, schedule, noise, window_size=window, model_dtype=torch.float64)
        ref = sample_sequential(module, schedule, noise, model_dtype=torch.float64)
    assert not out.trajectory.requires_grad and torch.equal(out.trajectory, plain.trajectory)
    assert not ref.requires_grad
    assert torch.equal(ref, sample_sequential(model, schedule, noise, model_dtype=torch.float64))
    pulled = solve(guided, schedule, noise, window_size=window, tol1=0, tol2=0, model_dtype=torch.float64)
    ref = sample_sequential(guided, schedule, noise, model_dtype=torch.float64)
    assert torch.allclose(pulled.trajectory, ref, atol=1e-12, rtol=0)
    assert not torch.allclose(pulled.trajectory, plain.trajectory, atol=1e-6, rtol=0)  # the pull acted


def test_non_finite_model_output_names_iteration_and_step():
    model, schedule, noise = gmm_problem(10)

    def broken(x, t, cond):
        eps = model(x, t, cond)
        eps[t == int(schedule.timesteps[6])] = float("nan")
        return eps

    with pytest.raises(NonFiniteModelOutput, match=r"iteration 1, sample 0, step 6 \(model timestep"):
        solve(broken, schedule, noise, model_dtype=torch.float64)


def test_non_finite_output_of_a_later_sample_and_call_is_found():
    """The solver checks predictions through the residuals it reads per sample: an inf in the second sample's
    rows of the second call is named as such, whatever the first sample's rows hold."""
    model, schedule, noise = gmm_problem(10, batch=2)
    calls = []

    def broken(x, t, cond):
        calls.append(t.clone())
        eps = model(x, t, cond)
        if len(calls) == 2:
            eps[-1] = float("inf")  # the last input of a call is the second sample's noisiest window state
        return eps

    with pytest.raises(NonFiniteModelOutput, match=r"iteration 2, sample 1, step \d+ \(model timestep") as info:
        solve(broken, schedule, noise, window_size=4, model_dtype=torch.float64)
    step = int(info.value.args[0].split("step ")[1].split(" ")[0])
    assert int(schedule.timesteps[step]) == int(calls[1][-1])


def test_unusable_anderson_problem_falls_back_to_plain_update(monkeypatch):
    model, schedule, noise = gmm_problem(20)
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    real = torch.linalg.solve_ex

    def poisoned(A, b):
        gamma, info = real(A, b)
        return torch.full_like(gamma, float("nan")), info

    monkeypatch.setattr(torch.linalg, "solve_ex", poisoned)
    out = solve(model, schedule, noise, memory_size=3, tol1=0, tol2=0, model_dtype=torch.float64)
    assert sum(out.history[0].fallbacks) > 0
    assert torch.allclose(out.trajectory, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs, name", [
    (dict(window_size=0), "window_size"), (dict(order=0), "order"), (dict(memory_size=0), "memory_size"),
    (dict(tol1=-1e-3), "tol1"), (dict(tol2=-1.0), "tol2"), (dict(tol1=float("nan")), "tol1"),
    (dict(max_steps=0), "max_steps"), (dict(window_size=2.5), "window_size"),
    (dict(equations="euler"), "equations"),
])
def test_bad_configuration_raises_value_error_naming_it(kwargs, name):
    model, schedule, noise = gmm_problem(10)
    with pytest.raises(ValueError, match=name):
        solve(model, schedule, noise, **kwargs)


def _wrong_arguments(what):
    """solve's arguments after eps_fn (args, kwargs) with one thing wrong, the exception and its message."""
    model, schedule, noise = gmm_problem(10, batch=2)
    c = torch.tensor([0, 1])
    return model, {
        "extra cond rows": ((schedule, noise, torch.tensor([0, 1, 2])), {}, ValueError, r"cond .*B = 2.*\(3,\)"),
        "missing dict rows": ((schedule, noise, {"y": c, "z": c[:1]}), {}, ValueError, r"cond\['z'\].*B = 2"),
        "cond a list": ((schedule, noise, [0, 1]), {}, TypeError, "cond must be a tensor"),
        "no samples": ((schedule, noise[:0]), {}, ValueError, r"noise must be \[B >= 1"),
        "empty latent": ((schedule, noise[..., :0]), {}, ValueError, r"none of size 0"),
        "noise of another T": ((dit_schedule(12), noise), {}, ValueError, r"T\+1=13.*\(2, 11"),
        "noise a list": ((schedule, noise.tolist()), {}, TypeError, "noise must be a floating-point tensor"),
        "integer noise": ((schedule, noise.long()), {}, TypeError, "noise must be a floating-point.*int64"),
        # at eta 0 the solver never reads a step's noise, the sequential sampler multiplies it by 0: NaN either way
        "NaN in the noise": ((schedule, _poked(noise, 1, 3, float("nan"))), {}, ValueError,
                             r"noise has a non-finite value: sample 1, index 3 \(the noise of step 3\)"),
        "inf as x_T": ((schedule, _poked(noise, 0, 10, float("inf"))), {}, ValueError, r"sample 0, index 10 \(x_T\)"),
        "dtype as text": ((schedule, noise), dict(model_dtype="float64"), TypeError, "model_dtype"),
        # the states are cast to it for every call: integers gave samples a hundred times too large
        "integer model dtype": ((schedule, noise), dict(model_dtype=torch.int64), TypeError,
                                "model_dtype must be a floating-point"),
        "schedule as text": (("ddim", noise), {}, TypeError, "schedule must be a paratAA.Schedule"),
        "no latent dimensions": ((schedule, noise[:, :, 0, 0, 0]), {}, ValueError, "at least one latent dimension"),
        "sharding as text": ((schedule, noise), dict(sharding="x"), TypeError, "sharding must be"),
        "callback not callable": ((schedule, noise), dict(callback=5), TypeError, "callback must be callable"),
        "config a dict": ((schedule, noise, c, {"window_size": 4}), {}, TypeError, "config must be a SolverConfig"),
    }[what]


def _poked(noise, b, s, value):
    noise = noise.clone()
    noise[b, s, 0, 0, 0] = value
    return noise


WRONG = ["extra cond rows", "missing dict rows", "cond a list", "no samples", "noise of another T", "noise a list",
         "integer noise", "NaN in the noise", "inf as x_T", "dtype as text", "integer model dtype", "schedule as text",
         "no latent dimensions", "sharding as text", "callback not callable"]


@pytest.mark.parametrize("sampler, what", [("solve", w) for w in WRONG + ["config a dict"]]
                         + [("sequential", w) for w in WRONG])
def test_wrong_arguments_are_refused_before_any_model_call(sampler, what):
    """Refused naming the argument, not picked by index: extra rows of cond were silently ignored before."""
    model, (args, kwargs, error, text) = _wrong_arguments(what)
    calls = []
    with pytest.raises(error, match=text):
        fn = solve if sampler == "solve" else sample_sequential
        fn(lambda x, t, c: calls.append(1) or model(x, t, c), *args, **kwargs)
    assert not calls


@pytest.mark.parametrize("window", [1, 4, "auto"])  # auto: the planner's timed calls are checked too
@pytest.mark.parametrize("wrong, error, text", [
    (lambda eps: eps[:, :2], ValueError, r"eps_fn returned shape \(\d+, 2, 8, 8\) for inputs of shape \(\d+, 4, 8, 8\)"),
    (lambda eps: eps[:1], ValueError, r"eps_fn returned shape \(1, 4, 8, 8\)"),
    (lambda eps: (eps,), TypeError, "eps_fn must return a tensor, got tuple"),
    (lambda eps: type("UNet2DConditionOutput", (), {"sample": eps})(), TypeError, r"take its \.sample"),
    # an integer or complex prediction was cast (rounded, or its imaginary part dropped) and sampled silently
    (lambda eps: (eps * 3).long(), TypeError, "eps_fn must return a floating-point tensor, got torch.int64"),
    (lambda eps: eps.to(torch.complex128), TypeError, "floating-point tensor, got torch.complex128"),
    # a prediction left on another device failed inside torch, naming neither eps_fn nor the device
    (lambda eps: eps.to("meta"), ValueError, "eps_fn returned a tensor on meta for inputs on cpu"),
], ids=["channels", "rows", "tuple", "output object", "integer", "complex", "device"])
def test_a_model_output_of_the_wrong_shape_is_refused_naming_it(wrong, error, text, window):
    model, schedule, noise = gmm_problem(10, batch=2)
    for fn in (solve, sample_sequential):
        with pytest.raises(error, match=text):
            kwargs = dict(window_size=window) if fn is solve else {}
            fn(lambda x, t, c: wrong(model(x, t, c)), schedule, noise, model_dtype=torch.float64, **kwargs)


def test_states_that_overflow_with_finite_predictions_are_refused_by_both_samplers():
    """Predictions near the top of the float range are finite, the step they make is not: sample_sequential
    returned a trajectory of -inf without a word (solve's residuals caught it)."""
    _, schedule, noise = gmm_problem(10)
    for fn in (solve, sample_sequential):
        with pytest.raises(FloatingPointError, match="finite model outputs|the model's outputs were finite"):
            fn(lambda x, t, c: torch.full_like(x, 1e308), schedule, noise, model_dtype=torch.float64)


def test_states_that_overflowed_are_not_blamed_on_the_model():
    """States that overflowed in one iteration (the TAA step can, with lam 0 and the guard off) reach the model in the
    next, which answers NaN, as a network does for an inf input: the run named the model ("the model returned a
    non-finite noise prediction at iteration 2")."""
    _, schedule, noise = gmm_problem(10)
    with pytest.raises(FloatingPointError, match="states of sample 0 became non-finite before iteration 2 while the "
                                                 "model's outputs were finite"):
        solve(lambda x, t, c: x * 0 + 1e308, schedule, noise, model_dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"or the TAA step overflowed \(lam 0, taa_guard 0"):
        solve(lambda x, t, c: x * 0 + 1e308, schedule, noise, lam=0, taa_guard=0, model_dtype=torch.float64)


def test_noise_or_init_without_values_is_named():
    """A meta tensor has a shape and no values: the finiteness check failed inside torch, naming neither."""
    model, schedule, noise = gmm_problem(10)
    for fn in (solve, sample_sequential):
        with pytest.raises(ValueError, match="noise is on the meta device"):
            fn(model, schedule, noise.to("meta"))
    with pytest.raises(ValueError, match="init is on the meta device"):
        solve(model, schedule, noise, init=noise.to("meta"), variation_steps=5)


def test_an_eps_fn_that_is_not_callable_is_named():
    model, schedule, noise = gmm_problem(10)
    for fn in (solve, sample_sequential):
        with pytest.raises(TypeError, match="eps_fn must be callable"):
            fn(3, schedule, noise)


@pytest.mark.parametrize("window", [1, 4])  # window 1 runs as sequential sampling: it skipped the check
def test_a_bad_warm_start_trajectory_is_named(window):
    model, schedule, noise = gmm_problem(10, batch=2)
    nan = noise.clone()
    nan[1, 4, 0, 0, 0] = float("nan")
    for init, text in [(torch.zeros(2, 3), r"init must be a floating-point tensor shaped like noise \(2, 11"),
                       (noise.tolist(), "init must be"), (noise.long(), "init must be"),
                       (nan, "init has a non-finite value: sample 1, state 4")]:
        with pytest.raises(ValueError, match=text):
            solve(lambda *a: pytest.fail("no model call"), schedule, noise, init=init, variation_steps=3,
                  window_size=window)


@pytest.mark.parametrize("kwargs, text", [
    (dict(start=5), "start needs init"),
    (dict(init="noise", start=16), r"start must be an integer in 1..10, got 16"),
    (dict(init="noise", start=-2), "start must be"), (dict(init="noise", start=0), "start must be"),
    (dict(steps=-3), r"steps must be an integer >= 0"), (dict(steps=2.5), "steps must be"),
    (dict(init=torch.zeros(5), start=3), "init must be"),
])
def test_bad_sequential_start_steps_and_init_are_named(kwargs, text):
    """Before: an IndexError from inside, or (start -2, steps -3) no step taken and no error."""
    model, schedule, noise = gmm_problem(10)
    kwargs = {k: noise if v == "noise" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=text):
        sample_sequential(lambda *a: pytest.fail("no model call"), schedule, noise, **kwargs)


@pytest.mark.parametrize("V", [0, 11, -1])
def test_bad_variation_steps(V):
    model, schedule, noise = gmm_problem(10)
    with pytest.raises(ValueError, match=f"variation_steps.*{V}"):
        solve(model, schedule, noise, init=noise, variation_steps=V)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_taa_step_solves_each_states_least_squares_problem(m):
    """paratAA.anderson against equations (3)-(4) written out per state: a window sliding down, states entering at
    its bottom with fewer columns than those above them, the columns of a state its m - 1 newest differences."""
    from paratAA.anderson import AndersonMemory
    T, D, lam = 12, 5, 1e-3
    gen = torch.Generator().manual_seed(m)
    memory = AndersonMemory(m, T, D, torch.device("cpu"))
    pushed = {t: [] for t in range(T)}   # per state: its (x, R) at every push, oldest first
    for lo, F in [(8, 12), (6, 12), (6, 11), (3, 9), (1, 8), (0, 7), (0, 6), (0, 4)]:
        x = torch.randn(T + 1, D, dtype=torch.float64, generator=gen)
        R = torch.randn(F - lo, D, dtype=torch.float64, generator=gen)
        memory.push(x[lo:F], R, lo, F)
        for i, t in enumerate(range(lo, F)):
            pushed[t].append((x[t].clone(), R[i].clone()))
        for p in range(1, F - lo):
            step, bad = memory.step(R, lo, F, p, lam)
            assert not bad.any()
            for i, t in enumerate(range(lo, lo + p)):
                cols = min(len(pushed[t]) - 1, m - 1)   # the state's own history, newest difference first

                def differences(s, k):  # [k, D] each: dX, dR of state s, newest first
                    h = pushed[s]
                    return (torch.stack([h[-1 - j][0] - h[-2 - j][0] for j in range(k)]),
                            torch.stack([h[-1 - j][1] - h[-2 - j][1] for j in range(k)]))
                if cols == 0:
                    expected = R[i]
                else:
                    A = lam * torch.eye(cols, dtype=torch.float64)
                    rhs = torch.zeros(cols, dtype=torch.float64)
                    for j, s in enumerate(range(t, F)):  # the state and every noisier state of the window
                        dR = differences(s, cols)[1]
                        A += dR @ dR.T
                        rhs += dR @ R[i + j]
                    gamma = torch.linalg.solve(A, rhs)
                    dX, dR = differences(t, cols)
                    expected = R[i] - (dX + dR).T @ gamma
                assert torch.allclose(step[i], expected, atol=1e-10, rtol=1e-10), (lo, F, p, t)


def test_huge_but_finite_model_output_is_not_refused():
    """The finiteness check sums the call's output: entries whose sum overflows float64 are still finite."""
    model, schedule, noise = gmm_problem(6)

    def huge(x, t, cond):
        out = model(x, t, cond).clone()
        out.view(out.shape[0], -1)[:, :2] = 1e308  # two per row: every row's sum and the call's overflow
        return out

    out = solve(huge, schedule, noise, model_dtype=torch.float64, max_steps=1)
    assert out.iterations == [1]


def test_a_schedule_with_non_finite_coefficients_is_named_before_any_model_call():
    """A NaN residual passes every test (NaN > tolerance is false): the run ended 'converged' on a NaN sample when
    the schedule's coefficients were unusable; then it was an error after the first model call, and a NaN or
    negative sigma made every state pass its tolerance (one iteration, 'converged', far from the result). A hand-built
    schedule's coefficients are checked before the model is called, naming the field and the step."""
    from dataclasses import replace
    model, schedule, noise = gmm_problem(10)
    for field, value, text in (("a", float("nan"), r"schedule\.a must be finite: step 9 is nan"),
                               ("b", float("inf"), r"schedule\.b must be finite: step 9 is inf"),
                               ("sigma", float("nan"), r"schedule\.sigma must be finite and >= 0: step 9 is nan"),
                               ("sigma", -0.5, r"schedule\.sigma must be finite and >= 0: step 9 is -0\.5")):
        broken = replace(schedule, **{field: getattr(schedule, field).clone().index_fill_(0, torch.tensor([9]), value)})
        for fn in (solve, sample_sequential):
            with pytest.raises(ValueError, match=text):
                fn(lambda *a: pytest.fail("no model call"), broken, noise, model_dtype=torch.float64)


def test_a_warm_starts_x0_record_is_the_lowest_state_its_window_reached_at_every_window():
    """step_<k>.png of a warm start (parallel_sd_winit.py's prompt2): window 1 recorded x_{variation_steps} as the
    initial state and then the state just computed, a wider window recorded x_0 of the trajectory it started from
    (prompt1's image) until the window reached it, so its first iterations showed prompt1's image unchanged. Before
    iteration 1 both record what the run starts from, that trajectory's x_0 (the reference's step_0 of prompt2:
    prompt1's image; it was x_{variation_steps}, 47 gray levels from it on the embedded model)."""
    model, schedule, noise = gmm_problem(12)
    init = solve(model, schedule, noise, window_size=12, tol1=0.0, tol2=0.0, model_dtype=torch.float64).trajectory
    V = 8
    one = solve(model, schedule, noise, window_size=1, init=init, variation_steps=V, record_x0=True,
                model_dtype=torch.float64)
    wide = solve(model, schedule, noise, window_size=3, init=init, variation_steps=V, record_x0=True,
                 model_dtype=torch.float64)
    assert torch.equal(one.history[0].x0[0], init[0, 0]) and torch.equal(wide.history[0].x0[0], init[0, 0])
    assert torch.equal(one.history[0].x0[1], one.trajectory[0, V - 1])  # then the state just computed
    assert not torch.equal(wide.history[0].x0[1], init[0, 0])  # iteration 1 updated states V-3 .. V-1
    capped = solve(model, schedule, noise, window_size=3, init=init, variation_steps=V, max_steps=1,
                   model_dtype=torch.float64)
    assert torch.equal(capped.samples[0], capped.trajectory[0, V - 3])  # the lowest state reached, as at window 1


@pytest.mark.parametrize("equations, order", [("picard", 1), ("ddim", 2), ("picard", 2)])
def test_the_boundary_state_is_final_even_after_taa_diverged(equations, order):
    """With lam = 0 and more TAA columns than latent values the least-squares problems are near-singular and the
    TAA iterates below the boundary reach 1e18. The boundary state's update was x_p + R_p = x_p + (target - x_p),
    which keeps only the digits of the target that x_p leaves: frozen 0.98 off at tolerance 0. It is computed from
    the frozen states alone now."""
    model, schedule, noise = gmm_problem(20, batch=2, latent=(1,), seed=0)
    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    out = solve(model, schedule, noise, memory_size=20, lam=0.0, taa_guard=0.0, tol1=0, tol2=0, equations=equations,
                order=order, model_dtype=torch.float64)
    assert max(max(h.residual) for h in out.history) > 1e6  # the TAA iterates did diverge
    assert torch.allclose(out.trajectory, ref, atol=1e-10, rtol=0), float((out.trajectory - ref).abs().max())


def test_an_eps_fn_changing_its_input_in_place_leaves_the_trajectory_alone():
    """In the states' own dtype (model_dtype float64) sample_sequential handed the model a view of its trajectory:
    an eps_fn scaling its input in place changed x_{s+1} itself, 100 off the solver's result (whose inputs are a
    copy), and solve at window 1, which runs sample_sequential, off its own result at window 4."""
    model, schedule, noise = gmm_problem(8, batch=2)

    def scaling(x, t, c):
        x.mul_(2.0)  # e.g. an input scaling written in place (by 2: exact)
        return model(x / 2.0, t, c)

    ref = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    assert torch.equal(sample_sequential(scaling, schedule, noise, model_dtype=torch.float64), ref)
    for window in (1, 4):
        out = solve(scaling, schedule, noise, window_size=window, tol1=0, tol2=0, model_dtype=torch.float64)
        assert torch.allclose(out.trajectory, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("field, value, text", [
    ("a", lambda s: s.a[:-1], r"schedule\.a must be a floating-point tensor \[T=10\].*\(9,\)"),
    ("sigma", lambda s: torch.cat([s.sigma, s.sigma]), r"schedule\.sigma .*\(20,\)"),
    ("b", lambda s: s.b.long(), r"schedule\.b .*int64"),
    ("c", lambda s: s.c.tolist(), r"schedule\.c .*list"),
    ("timesteps", lambda s: s.timesteps[:0], r"schedule\.timesteps must be a 1-D tensor of the T >= 1"),
])
def test_a_schedule_whose_coefficients_are_not_one_per_step_is_named(field, value, text):
    """A Schedule built by hand: before, a size mismatch inside torch (solve), an IndexError (sample_sequential),
    extra entries ignored without a word, or for no steps at all 'window_size must be an integer >= 1, got 0'."""
    from dataclasses import replace
    model, schedule, noise = gmm_problem(10)
    broken = replace(schedule, **{field: value(schedule)})
    for fn in (solve, sample_sequential):
        with pytest.raises(ValueError, match=text):
            fn(lambda *a: pytest.fail("no model call"), broken, noise)


def test_an_auto_window_for_a_warm_start_is_planned_for_the_steps_it_re_solves(monkeypatch):
    """The scripts plan a warm start's window for its variation_steps (runner/planning.py); solve() in Python
    planned it for all T steps (equation (5)'s K(W) and the candidate windows up to T)."""
    import paratAA.solver as solver_module
    seen = []
    real = solver_module.plan_window
    monkeypatch.setattr(solver_module, "plan_window", lambda *a, **k: seen.append(k.get("steps")) or real(*a, **k))
    model, schedule, noise = gmm_problem(12)
    init = sample_sequential(model, schedule, noise, model_dtype=torch.float64)
    solve(model, schedule, noise, init=init, variation_steps=5, window_size="auto", model_dtype=torch.float64)
    solve(model, schedule, noise, window_size="auto", model_dtype=torch.float64)
    assert seen == [5, None]
