"""SolverConfig owns every solver parameter: one default set, one check, the flags generated from it."""
import json
from dataclasses import fields

import numpy as np
import pytest
import torch

import parallel_dit
import parallel_sd
import parallel_sd_winit
from paratAA import SolverConfig, solve
from runner.errors import UsageError
from runner.flags import check_common_flags
from tests.conftest import gmm_problem


@pytest.mark.parametrize("script", [parallel_dit, parallel_sd, parallel_sd_winit])
def test_script_flags_are_the_config_fields_with_its_defaults(script):
    """The same defaults, except the one the scripts take from the hardware (runner.flags.SCRIPT_DEFAULTS), once
    the flags are checked (init_states is unset until then: runner.flags.UNSET_UNTIL_CHECKED)."""
    from runner.flags import SCRIPT_DEFAULTS
    args = script.parse_args([])
    assert SCRIPT_DEFAULTS == {"window_size": "auto"} and args.init_states is None
    check_common_flags(args, 1000)
    assert {f.name: getattr(args, f.name) for f in fields(SolverConfig)} == {**SolverConfig().to_dict(),
                                                                             **SCRIPT_DEFAULTS}


@pytest.mark.parametrize("script", [parallel_dit, parallel_sd, parallel_sd_winit])
def test_help_prints_every_solver_flag(script, capsys):
    """--help exits 0 and lists every solver flag with its help text (argparse formats help texts with %, which a
    help text's own "18%" broke)."""
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--help"])
    assert e.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # whitespace aside: argparse wraps lines, also at hyphens
    for f in fields(SolverConfig):
        assert f"--{f.name}" in text
        assert "".join(f.metadata["help"].split()) in text, f.name


def test_solve_uses_the_config_defaults():
    model, schedule, noise = gmm_problem(12)
    out = solve(model, schedule, noise, model_dtype=torch.float64)
    assert out.config == SolverConfig().resolve(12)
    explicit = solve(model, schedule, noise, None, SolverConfig(), model_dtype=torch.float64)
    assert explicit.iterations == out.iterations and torch.equal(explicit.samples, out.samples)


def test_keyword_overrides_equal_a_config():
    model, schedule, noise = gmm_problem(12)
    a = solve(model, schedule, noise, window_size=5, memory_size=2, model_dtype=torch.float64)
    b = solve(model, schedule, noise, config=SolverConfig(window_size=5, memory_size=2), model_dtype=torch.float64)
    assert a.iterations == b.iterations and torch.equal(a.trajectory, b.trajectory)
    assert a.config.window_size == 5 and a.config.order == 5


def test_unknown_parameter_or_a_config_in_place_of_cond_is_a_type_error():
    model, schedule, noise = gmm_problem(5)
    with pytest.raises(TypeError, match="windowsize"):
        solve(model, schedule, noise, windowsize=3)
    with pytest.raises(TypeError, match="config="):
        solve(model, schedule, noise, SolverConfig())


@pytest.mark.parametrize("T, window, order, used", [(10, None, None, (10, 10)), (10, 50, None, (10, 10)),
                                                    (10, 4, None, (4, 4)), (10, 4, 9, (4, 4)), (10, None, 3, (10, 3)),
                                                    (10, 30, 20, (10, 10))])
def test_resolve_records_the_values_used(T, window, order, used):
    c = SolverConfig(window_size=window, order=order).resolve(T)
    assert (c.window_size, c.order) == used


@pytest.mark.parametrize("name, value", [("window_size", 0), ("order", -1), ("memory_size", 1.5),
                                         ("memory_size", True), ("tol1", float("nan")), ("tol2", -1e-3),
                                         ("lam", float("inf")), ("max_steps", 0), ("equations", "euler"),
                                         ("block_tol", -1.0), ("block_tol", float("nan")), ("settle", 1.5),
                                         ("stop_tol", 1.0), ("stop_tol", 1e3), ("tol1", 1e308), ("tol2", 1.0),
                                         ("slide_tol", 5.0), ("stop_image_tol", -1.0),
                                         ("stop_image_tol", float("nan"))])
def test_bad_values_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=f"^{name} must"):
        SolverConfig(**{name: value})


def test_numpy_numbers_are_taken_as_the_python_numbers_they_equal():
    """A window or tolerance computed with numpy (a sweep over np.arange) is a number like any other; stored as
    Python's, so that metrics.json can hold the config, and the solve equals the one with Python numbers."""
    model, schedule, noise = gmm_problem(12)
    given = SolverConfig(window_size=np.int64(5), memory_size=np.int32(2), lam=np.float32(0.5), tol1=np.float64(1e-4))
    assert [type(getattr(given, n)) for n in ("window_size", "memory_size", "lam", "tol1")] == [int, int, float, float]
    json.dumps(given.to_dict())
    plain = SolverConfig(window_size=5, memory_size=2, lam=float(np.float32(0.5)), tol1=1e-4)
    a = solve(model, schedule, noise, config=given, model_dtype=torch.float64)
    b = solve(model, schedule, noise, config=plain, model_dtype=torch.float64)
    assert a.iterations == b.iterations and torch.equal(a.trajectory, b.trajectory)
    with pytest.raises(ValueError, match="^window_size must"):
        SolverConfig(window_size=np.bool_(True))
    with pytest.raises(ValueError, match="^lam must"):
        SolverConfig(lam=np.float32("nan"))


def test_flags_check_through_the_config_and_record_the_values_used(tmp_path):
    args = parallel_dit.parse_args(["--timesteps", "20", "--window_size", "50", "--output_path", str(tmp_path)])
    config = check_common_flags(args, 1000)
    assert (config.window_size, config.order) == (20, 20) and (args.window_size, args.order) == (20, 20)
    args = parallel_dit.parse_args(["--lam", "-1", "--output_path", str(tmp_path)])
    with pytest.raises(UsageError, match="^--lam must be a finite number >= 0, got -1"):
        check_common_flags(args, 1000)


def test_the_algorithm_package_imports_only_torch_numpy_and_diffusers():
    """paratAA/ is the algorithm: no run layer (accelerate, PIL, tqdm, matplotlib, runner, models) in its imports
    (numpy: DiT builds its noise levels with it, and the schedule does the same to match it to round-off)."""
    import ast
    import os
    import sys
    from tests.conftest import ROOT
    folder = os.path.join(ROOT, "paratAA")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(folder, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in ("torch", "diffusers", "numpy") or root in sys.stdlib_module_names, (name, root)


def test_the_paper_preset_fills_the_references_defaults_and_explicit_flags_win():
    args = parallel_sd.parse_args(["--preset", "paper"])
    assert (args.timesteps, args.window_size, args.order, args.memory_size, args.equations, args.stop_tol) == \
        (50, 100, 20, 2, "ddim", 0.0)
    args = parallel_sd.parse_args(["--preset", "paper", "--memory_size", "3", "--timesteps", "30"])
    assert (args.memory_size, args.timesteps, args.order) == (3, 30, 20)


@pytest.mark.parametrize("module, argv, name, value", [
    (parallel_sd, ["--window_size", "10", "--timesteps", "20"], "order", 10),
    (parallel_dit, ["--window_size=4", "--timesteps", "20"], "order", 4),
    (parallel_sd_winit, ["--timesteps", "5"], "variation_steps", 5),
])
def test_a_preset_value_bounded_by_an_explicit_flag_follows_it(module, argv, name, value):
    """The preset's order (20, 100) above an explicit --window_size, or its variation steps (10) above an explicit
    --timesteps, would refuse a flag the user never gave."""
    args = module.parse_args(["--preset", "paper"] + argv)
    assert getattr(args, name) == value
    check_common_flags(args, 1000)  # accepted


def test_an_explicit_order_above_the_window_is_still_refused():
    args = parallel_sd.parse_args(["--preset", "paper", "--window_size", "10", "--order", "20"])
    with pytest.raises(UsageError, match="--order"):
        check_common_flags(args, 1000)


def test_a_settle_above_1_is_refused_rather_than_run_as_1(tmp_path):
    """The solver asks settle x the tolerance only for settle below 1; --settle 3 was accepted and recorded in
    metrics.json, and ran exactly as --settle 1."""
    args = parallel_dit.parse_args(["--settle", "3", "--output_path", str(tmp_path)])
    with pytest.raises(UsageError, match=r"^--settle must be in 0\.\.1"):
        check_common_flags(args, 1000)
    args = parallel_dit.parse_args(["--settle", "1", "--output_path", str(tmp_path)])
    assert check_common_flags(args, 1000).settle == 1.0


@pytest.mark.parametrize("module", [parallel_dit, parallel_sd, parallel_sd_winit])
def test_an_explicit_init_states_is_not_silently_replaced_by_the_presets_reference_quirks(module, tmp_path):
    """reference_quirks starts new states as the reference does whatever init_states says: --preset paper
    --init_states ddim ran exactly as the preset's copy, where explicit flags are to win over the preset."""
    out = ["--output_path", str(tmp_path)]
    args = module.parse_args(["--preset", "paper", "--init_states", "ddim"] + out)
    with pytest.raises(UsageError, match="^--init_states ddim has no effect with --reference_quirks"):
        check_common_flags(args, 1000)
    args = module.parse_args(["--preset", "paper", "--init_states", "ddim", "--no-reference_quirks"] + out)
    config = check_common_flags(args, 1000)
    assert (config.init_states, config.reference_quirks) == ("ddim", False)
    for argv in (["--preset", "paper"], ["--preset", "paper", "--init_states=copy"]):  # the preset's own value
        assert check_common_flags(module.parse_args(argv + out), 1000).init_states == "copy"


@pytest.mark.parametrize("module", [parallel_dit, parallel_sd, parallel_sd_winit])
def test_an_explicit_init_states_is_not_silently_replaced_by_reference_quirks(module, tmp_path):
    """Without the preset too: --reference_quirks --init_states ddim ran as the reference's start of new states
    and recorded ddim. The flag alone is what it was; args.json records what ran."""
    out = ["--output_path", str(tmp_path)]
    for argv in (["--reference_quirks", "--init_states", "ddim"], ["--init_states=ddim", "--reference_quirks"]):
        with pytest.raises(UsageError, match="^--init_states ddim has no effect with --reference_quirks, which"):
            check_common_flags(module.parse_args(argv + out), 1000)
    args = module.parse_args(["--reference_quirks"] + out)
    assert check_common_flags(args, 1000).reference_quirks and args.init_states == "copy"
    for argv, used in (([], "ddim"), (["--init_states", "copy"], "copy"), (["--init_states", "ddim"], "ddim")):
        args = module.parse_args(argv + out)
        assert check_common_flags(args, 1000).init_states == used == args.init_states


def test_an_explicit_init_states_ddim_beside_reference_quirks_is_refused_in_python():
    """solve(..., init_states="ddim", reference_quirks=True) ran exactly as without init_states: the keywords (what
    solve and parallel_sample take on top of config) tell an explicit value, so it is refused, naming both."""
    model, schedule, noise = gmm_problem(5)
    for kw in ({"init_states": "ddim", "reference_quirks": True},
               {"init_states": "ddim", "config": SolverConfig.paper()},
               {"init_states": "ddim", "config": SolverConfig(reference_quirks=True)}):
        with pytest.raises(ValueError, match="^init_states 'ddim' has no effect with reference_quirks=True"):
            solve(model, schedule, noise, model_dtype=torch.float64, **kw)
    with pytest.raises(ValueError, match="^init_states 'ddim' has no effect with reference_quirks"):
        SolverConfig.paper(init_states="ddim")
    with pytest.raises(ValueError, match="^init_states 'ddim'"):  # parallel_sample's path to its config
        SolverConfig.with_overrides(None, {"init_states": "ddim", "reference_quirks": True}, "parallel_sample")
    # as before: reference_quirks with init_states at its default, an explicit copy, or a config built whole (which
    # cannot tell its default ddim from an explicit one)
    for kw in ({"reference_quirks": True}, {"reference_quirks": True, "init_states": "copy"},
               {"config": SolverConfig(init_states="ddim", reference_quirks=True)},
               {"config": SolverConfig.paper(), "init_states": "copy"}, {"init_states": "ddim"}):
        assert all(solve(model, schedule, noise, model_dtype=torch.float64, **kw).converged), kw
    assert SolverConfig.paper(init_states="ddim", reference_quirks=False).init_states == "ddim"


def test_the_paper_preset_of_the_warm_start_solves_one_sample_per_prompt_as_the_reference():
    """The reference's parallel_sd_winit.py has no --num_samples: it solves one sample for each prompt."""
    assert parallel_sd_winit.parse_args(["--preset", "paper"]).num_samples == 1
    assert parallel_sd_winit.parse_args(["--preset", "paper", "--num_samples", "4"]).num_samples == 4
    assert parallel_sd.parse_args(["--preset", "paper"]).num_samples == 10  # the reference SD script's default
