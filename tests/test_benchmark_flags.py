"""The benchmark scripts' bad input: one line on stderr naming the flag or file, exit 2 (flags) or 1 (files), no
traceback, nothing written, and all of it before any model is loaded; an interrupted or failed run leaves nothing."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT

TOP = str(2 ** 64 - 1)  # the largest torch generator seed
# sizes that keep a run of the old, unchecked scripts short before they fail
SETS = ["dit", "--num_samples", "1", "--batch_size", "1", "--timesteps", "2", "--methods", "ParaTAA m=3"]
# a prompt of our own: no digit classifier to train (seconds) before sampling
SD_SETS = ["sd", "--prompt", "a handwritten digit one", "--num_samples", "1", "--batch_size", "1", "--timesteps", "2",
           "--methods", "ParaTAA m=3"]
DIT = ["--quick", "--timesteps", "2", "--num_samples", "1", "--no-ablation"]


def run(script, *argv, **kwargs):
    options = {"capture_output": True, "text": True, "timeout": 60, "cwd": ROOT, **kwargs}
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, argv)], **options)


def one_line(script, stderr):
    """The single line on stderr, checked to be the script's error line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"{script}: "), lines
    return lines[0]


def refused(tmp_path, script, argv, code, words):
    """script argv exits with code and one error line holding words; nothing new appears in tmp_path. Run in this
    process, as the script's `exit_on_error(main, parse_args())` runs it (a process each cost 3 s of CI, and the
    refusals come before anything heavy); test_unusable_output_path runs each script once as a process."""
    import contextlib
    import importlib
    import io
    from runner.errors import STOP_SIGNALS, exit_on_error
    module = importlib.import_module("benchmarks." + script[:-3])
    before = sorted(os.listdir(tmp_path))
    err, cwd, handlers = io.StringIO(), os.getcwd(), [signal.getsignal(s) for s in STOP_SIGNALS]
    try:
        os.chdir(ROOT)  # default paths are relative to the repository, as from `python benchmarks/...` there
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                pytest.raises(SystemExit) as e:
            exit_on_error(module.main, module.parse_args([str(a) for a in argv]))
    finally:
        os.chdir(cwd)
        for s, h in zip(STOP_SIGNALS, handlers):
            signal.signal(s, h)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0] and ": error: " in lines[0], lines
    assert e.value.code == code, (e.value.code, lines[0])
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    assert sorted(os.listdir(tmp_path)) == before, "nothing may be written"


def refused_by_process(tmp_path, script, argv, code, words):
    """As refused, through `python benchmarks/<script>`: the script's own entry, its line's prefix included."""
    before = sorted(os.listdir(tmp_path))
    proc = run(script, *argv)
    line = one_line(script, proc.stderr)
    assert proc.returncode == code and line.startswith(f"{script}: error: "), (proc.returncode, line)
    for w in words:
        assert str(w) in line, (w, line)
    assert sorted(os.listdir(tmp_path)) == before, "nothing may be written"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    return tmp_path


# 0 is a bad size, not "the default"
@pytest.mark.parametrize("flag", ["--num_samples", "--batch_size", "--timesteps"])
def test_sample_sets_zero_sizes(files, flag):
    refused(files, "sample_sets.py", SETS + [flag, "0", "--out_dir", files / "sets"], 2, [flag, "got 0"])


# a repeated value would be sampled twice and named once
@pytest.mark.parametrize("flag, values", [("--iterations", ["1", "1"]), ("--methods", ["ParaTAA m=3"] * 2)])
def test_sample_sets_repeated_values(files, flag, values):
    refused(files, "sample_sets.py", SETS + [flag, *values, "--out_dir", files / "sets"], 2, [flag, "repeat"])


# --summary naming a file the run writes in --out_dir: the summary JSON was written over that set, exit 0 (or, naming
# --out_dir itself, the run failed after all its sampling); now refused before any sampling. The first through the
# script, the others by its flag check in this process (a process each cost 4 s of CI)
@pytest.mark.parametrize("summary, out_dir, words", [
    ("{sets}/sequential.npz", "{sets}", ["sequential.npz"]),
    ("{files}/./sets/../sets/parataa_m_3.npz", "{sets}", ["parataa_m_3.npz"]),
    ("{files}/link/parataa_m_3_iter1.npz", "{sets}", ["parataa_m_3_iter1.npz"]),  # --out_dir through a symlink
    ("{sets}/.parataa_m_3.npy.part", "{sets}", [".parataa_m_3.npy.part"]),
    ("{files}/new", "{files}/new/sets", ["a folder above it"]),  # folders the run creates
])
def test_sample_sets_summary_over_a_set(files, summary, out_dir, words):
    from benchmarks.sample_sets import check_flags, method_names, parse_args
    from runner.errors import UsageError
    (files / "sets").mkdir()
    os.symlink(files / "sets", files / "link")
    paths = {"files": files, "sets": files / "sets"}
    argv = SETS + ["--iterations", "1", "--out_dir", out_dir.format(**paths), "--summary", summary.format(**paths)]
    if words == ["sequential.npz"]:
        refused(files, "sample_sets.py", argv, 2, ["--summary", "--out_dir", *words])
    else:
        with pytest.raises(UsageError) as e:
            check_flags(parse_args([str(a) for a in argv]), method_names())
        assert all(w in str(e.value) for w in ["--summary", "--out_dir", *words]), str(e.value)
    assert not os.listdir(files / "sets")


def test_sample_sets_refuses_labels_it_would_drop(files):
    """More --class_labels than --num_samples: the DiT sets sampled the first --num_samples labels without a word
    (parallel_dit.py and dit_bench.py refuse them); refused before the out_dir is made."""
    from benchmarks.sample_sets import main, parse_args
    from runner.errors import UsageError
    argv = SETS + ["--num_samples", "2", "--class_labels", "0", "1", "2", "--out_dir", str(files / "sets")]
    with pytest.raises(UsageError) as e:
        main(parse_args(argv))
    assert "--class_labels gives 3 labels for --num_samples 2" in str(e.value) and not (files / "sets").exists()


# --out naming a file the run reads: the report was written over it, exit 0 (gpu_estimate.py over its --dit report;
# the next run refused that file); a folder where dit_bench.py writes its images beside --out: refused after the whole
# run, the report lost. Now both before any work (in this process: the check is each script's first)
@pytest.mark.parametrize("script, argv, words", [
    ("gpu_estimate", ["--dit", "{r}", "--out", "{r}"], ["--out", "--dit", "reads"]),
    ("gpu_estimate", ["--sd", "{r}", "--out", "{files}/./{name}"], ["--out", "--sd", "reads"]),
    ("speed_bench", ["--quick", "--gpu", "{r}", "--out", "{link}"], ["--out", "--gpu", "reads"]),
    ("sd_bench", ["--quick", "--prompt_file", "{r}", "--out", "{r}"], ["--out", "--prompt_file", "reads"]),
    ("dit_bench", DIT + ["--out", "{files}/r.json"], ["--out", "r.evolution.npz", "not a folder"]),
])
def test_a_report_never_goes_over_what_the_run_reads(files, script, argv, words):
    import importlib
    from runner.errors import UsageError
    module = importlib.import_module(f"benchmarks.{script}")
    (files / "r.evolution.npz").mkdir()
    (files / "read.json").write_text("{}")
    os.symlink(files / "read.json", files / "link")
    paths = {"r": files / "read.json", "files": files, "name": "read.json", "link": files / "link"}
    before = sorted(os.listdir(files))
    with pytest.raises(UsageError) as e:
        module.main(module.parse_args([a.format(**paths) for a in argv]))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert sorted(os.listdir(files)) == before and (files / "read.json").read_text() == "{}"


# every output path before any work
OUTPUT_PATHS = [
    ("dit_bench.py", DIT + ["--out", "{a_folder}"], "--out"),
    ("dit_bench.py", DIT + ["--out", "{a_file}/x.json"], "--out"),
    ("solver_bench.py", ["--quick", "--out", "{a_folder}"], "--out"),
    ("solver_bench.py", ["--quick", "--out", "{a_file}/x.json"], "--out"),
    ("sample_sets.py", SETS + ["--summary", "{a_folder}", "--out_dir", "{new}"], "--summary"),
    ("sample_sets.py", SETS + ["--out_dir", "{a_file}"], "--out_dir"),
    ("sample_sets.py", SETS + ["--out_dir", ""], "--out_dir"),
    ("speed_bench.py", ["--quick", "--out", "{a_folder}"], "--out"),
    ("stop_bench.py", ["--quick", "--out", "{a_file}/x.json"], "--out"),
    ("tail_bench.py", ["--quick", "--seed_bases", "200", "--out", "{a_folder}"], "--out"),
    ("stop_sweep.py", ["--quick", "--seed_bases", "200", "--out", "{a_file}/x.json"], "--out"),
    ("figures.py", ["--out_dir", "{a_file}"], "--out_dir"),
    ("figures.py", ["--out_dir", ""], "--out_dir"),
    ("gpu_estimate.py", ["--out", "{a_folder}"], "--out"),
    ("gpu_bench.py", ["--smoke", "--out", "{a_folder}"], "--out"),
    ("gpu_scripts.py", ["--smoke", "--out", "{a_file}/x.json"], "--out"),
    ("settle_gpu.py", ["--quick", "--out", "{a_folder}"], "--out"),
]


# as processes: one script of each kind of entry (the signal guard before the imports, a plain one, sys.exit of
# exit_on_error's result, figures.py's); the entries are alike, and each process cost 3 s of CI
BY_PROCESS = ("stop_bench.py", "dit_bench.py", "gpu_scripts.py", "figures.py")


@pytest.mark.parametrize("script, argv, flag", OUTPUT_PATHS)
def test_unusable_output_path(files, script, argv, flag):
    paths = {"a_file": files / "a_file", "a_folder": files / "a_folder", "new": files / "new"}
    first = next(case for case in OUTPUT_PATHS if case[0] == script)
    check = refused_by_process if script in BY_PROCESS and first[1] is argv else refused
    check(files, script, [a.format(**paths) for a in argv], 2, [flag])
    assert not os.listdir(files / "a_folder")


def test_speed_bench_repeats(files):
    refused(files, "speed_bench.py", ["--repeats", "0", "--out", files / "speed.json"], 2, ["--repeats", "got 0"])


@pytest.mark.parametrize("gpu, words", [
    ("{tmp}/missing.json", ["missing.json"]),
    ("{tmp}/a_folder", ["a_folder"]),
    (os.path.join(ROOT, "benchmarks", "results", "solver.json"), ["solver.json", "paratAA"]),
])
def test_speed_bench_bad_gpu_file(files, gpu, words):
    refused(files, "speed_bench.py", ["--quick", "--gpu", gpu.format(tmp=files), "--out", files / "speed.json"], 1,
            ["--gpu", *words])


RESULTS = os.path.join(ROOT, "benchmarks", "results")


@pytest.mark.parametrize("argv, code, words", [
    # -2 GPUs gave a column of speed-ups above 8 GPUs', 0 a ZeroDivisionError after the table's header
    (["--gpus", "0"], 2, ["--gpus", "got 0"]), (["--gpus", "-2"], 2, ["--gpus"]),
    # another benchmark's report ended in a KeyError, or (a swapped one) was taken without a word
    (["--gpu", os.path.join(RESULTS, "dit.json")], 1, ["--gpu", "dit.json", "paratAA"]),
    (["--dit", os.path.join(RESULTS, "stop.json")], 1, ["--dit", "stop.json", "dit_bench.py"]),
    (["--dit", os.path.join(RESULTS, "sd.json")], 1, ["--dit", "sd.json", "dit_bench.py"]),
    (["--sd", os.path.join(RESULTS, "dit.json")], 1, ["--sd", "dit.json", "sd_bench.py"]),
])
def test_gpu_estimate_bad_inputs(files, argv, code, words):
    refused(files, "gpu_estimate.py", argv + ["--out", files / "estimate.json"], code, words)


@pytest.mark.parametrize("argv, flag", [(["--window_runs", "a:b"], "--window_runs"),
                                        (["--sd_window_runs", "8"], "--sd_window_runs"),
                                        (["--window_runs", "8:0"], "--window_runs"),
                                        (["--repeats", "0"], "--repeats"), (["--iterations", "0"], "--iterations")])
def test_gpu_bench_flags_before_any_gpu_time(files, argv, flag):
    """A malformed pair was parsed after the per-call timings and the default-flag runs: minutes of GPU time lost."""
    refused(files, "gpu_bench.py", argv + ["--out", files / "gpu.json"], 2, [flag])


def test_gpu_scripts_timeout(files):
    """--timeout 0 and below were taken, and a run past its time limit ended the script in a TimeoutExpired
    traceback line with no report: now refused, and a timed-out run is recorded as one."""
    refused(files, "gpu_scripts.py", ["--smoke", "--timeout", "0", "--out", files / "g.json"], 2, ["--timeout"])
    from benchmarks.gpu_scripts import run as run_one
    row = run_one("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], str(files / "runs"), None, 1)
    assert row["exit_code"] == "timeout" and row["seconds"] < 20


def test_figures_are_written_as_a_set(tmp_path):
    """A figure skipped this time left an earlier run's file of its name beside the new ones, and a target that could
    not be written (a folder of its name) ended the run with part of the set written."""
    from benchmarks.figures import FIGURES
    dit, sd, out = os.path.join(RESULTS, "dit.json"), os.path.join(RESULTS, "sd.json"), tmp_path / "figs"
    assert run("figures.py", "--dit", dit, "--sd", sd, "--out_dir", out, "--quick").returncode == 0
    assert sorted(os.listdir(out)) == sorted(FIGURES)
    proc = run("figures.py", "--dit", dit, "--out_dir", out, "--quick")  # the DiT's figures alone
    assert proc.returncode == 0 and "removed" in proc.stdout and "fig_e_warm_start.png" in proc.stdout
    assert "fig_e_warm_start.png" not in os.listdir(out)  # the DiT report has no warm start: (e) is not drawn
    blocked = tmp_path / "blocked"
    (blocked / "fig_c_window.png").mkdir(parents=True)
    refused(tmp_path, "figures.py", ["--dit", dit, "--out_dir", blocked, "--quick"], 1,
            ["--out_dir", "fig_c_window.png"])
    assert os.listdir(blocked) == ["fig_c_window.png"]


def test_the_sweeps_run_at_the_largest_timesteps():
    """gpu_estimate.py and figure (c) take the window sweep to be at the largest T; given as --timesteps 8 4 it ran
    at 4, and the estimate paired T = 8's sequential cost with T = 4's iterations."""
    from benchmarks.convergence import benchmark_steps
    assert benchmark_steps(argparse.Namespace(timesteps=[8, 4], quick=True)) == [4, 8]


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    """An interrupt (here: an error) in the middle of writing left a truncated report where the last one was."""
    from benchmarks.convergence import write_json
    out = tmp_path / "report.json"
    write_json({"old": 1}, str(out))

    class Unwritable:
        def __str__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_json({"a": list(range(10000)), "b": Unwritable()}, str(out))
    assert json.loads(out.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["report.json"]


@pytest.fixture
def reports(tmp_path):
    """Broken inputs of figures.py beside the good ones."""
    (tmp_path / "garbage.json").write_text("not json {")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "a_folder").mkdir()
    with open(os.path.join(ROOT, "benchmarks", "results", "dit.json")) as f:
        (tmp_path / "no_npz.json").write_text(f.read())  # its .evolution.npz is not beside it
    return tmp_path


@pytest.mark.parametrize("name, words", [("garbage.json", ["JSON"]), ("empty.json", ["methods"]),
                                         ("list.json", ["JSON object"]), ("a_folder", []),
                                         ("no_npz.json", ["dit.evolution.npz"])])
def test_figures_bad_report(reports, name, words):
    out = reports / "figs"
    refused(reports, "figures.py", ["--dit", reports / name, "--out_dir", out], 1, ["--dit", name, *words])


def test_figures_non_finite_evolution_images(files):
    """An .evolution.npz of float arrays holding a NaN or an infinity was drawn as figure (b) without a word, exit 0,
    while a NaN in the JSON is refused naming its key: now refused alike (exit 1), naming the .npz and the array.
    NaN through the script; the infinities, and finite floats drawn, by the reading function in this process."""
    import numpy as np
    from benchmarks.figures import NonFiniteArray, evolution_images
    with open(os.path.join(RESULTS, "dit.json")) as f:
        (files / "dit.json").write_text(f.read())
    report = json.loads((files / "dit.json").read_text())
    with np.load(os.path.join(RESULTS, "dit.evolution.npz")) as z:
        arrays = {key: z[key] / 255.0 for key in z.files}  # floats in 0..1, as imshow takes them
    for bad, words in ((float("nan"), ["NaN"]), (float("inf"), ["infinity"]), (float("-inf"), ["infinity"])):
        arrays["m4"][1, 2, 3, 0] = bad  # ParaTAA m=3, one of figure (b)'s rows
        np.savez(files / "dit.evolution.npz", **arrays)
        if words == ["NaN"]:
            refused(files, "figures.py", ["--dit", files / "dit.json", "--out_dir", files / "figs", "--quick"], 1,
                    ["--dit", "dit.evolution.npz", "array m4", *words])
        else:
            with pytest.raises(NonFiniteArray, match="dit.evolution.npz has an infinity in array m4"):
                evolution_images(report, str(files / "dit.json"))
    arrays["m4"][1, 2, 3, 0] = 0.5  # finite floats are read
    np.savez(files / "dit.evolution.npz", **arrays)
    assert evolution_images(report, str(files / "dit.json"))["ParaTAA m=3"].shape == arrays["m4"].shape


def test_figures_without_any_report_creates_no_folder(tmp_path):
    """Run where the default reports are not (another folder): named, and no folder created."""
    proc = run("figures.py", "--out_dir", tmp_path / "figs", cwd=tmp_path)
    line = one_line("figures.py", proc.stderr)
    assert proc.returncode == 1 and "no benchmark JSON" in line and os.listdir(tmp_path) == []


def test_figures_draw_only_the_reports_named(tmp_path):
    """With --dit or --sd given, the other flag's default was drawn beside it (section 10's checkpoint figures got
    the committed embedded model's panels, and its warm start as figure (e)); a file a flag names that is missing
    was skipped with exit 0, and a blank flag read as a missing file."""
    from benchmarks.figures import DEFAULT_REPORTS, parse_args, reports
    named = reports(parse_args(["--dit", "results/dit_xl2.json"]))
    assert [path for _, _, path, _ in named] == ["results/dit_xl2.json", None]
    assert [path for _, _, path, _ in reports(parse_args([]))] == list(DEFAULT_REPORTS)
    with pytest.raises(SystemExit):  # argparse's one line naming --dit, exit 2
        parse_args(["--dit", "", "--sd", "sd.json"])
    refused(tmp_path, "figures.py", ["--dit", tmp_path / "dit_xl2.jsn", "--sd", os.path.join(RESULTS, "sd.json"),
                                     "--out_dir", tmp_path / "figs"], 1, ["--dit", "dit_xl2.jsn", "not found"])


def test_the_warm_start_figure_names_each_model(monkeypatch):
    """Figure (e) had no title, the only figure not saying which model it measured (from section 10's commands
    with one flag it showed the embedded model's warm start unnamed), and drew only the first report with a
    warm-start table."""
    import io

    import matplotlib.axes
    from benchmarks.figures import fig_warm
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, *a, **k: titles.append(text))
    with open(os.path.join(RESULTS, "sd.json")) as f:
        sd = json.load(f)
    fig_warm({"embedded text-to-image": sd, "SD stable-diffusion-v1-5 512x512": sd}, io.BytesIO())
    assert titles == ["embedded text-to-image, T = 100", "SD stable-diffusion-v1-5 512x512, T = 100"]


def test_figures_to_a_full_terminal(tmp_path):
    with open("/dev/full", "w") as full:
        proc = run("figures.py", "--out_dir", tmp_path / "figs", "--quick", stdout=full, stderr=subprocess.PIPE,
                   capture_output=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(os.listdir(tmp_path / "figs")) == 6


@pytest.mark.parametrize("script, argv, flag", [
    ("stop_bench.py", ["--seed_base", TOP], "--seed_base"),
    ("stop_bench.py", ["--seed_base", "5"], "--seed_base"),
    ("stop_bench.py", ["--quick", "--windows", "0"], "--windows"),
    ("stop_bench.py", ["--quick", "--windows", "--slide_tol", "-1"], "--windows"),
    ("stop_bench.py", ["--quick", "--windows", "8", "--slide_tol", "nan"], "--slide_tol"),
    ("stop_bench.py", ["--quick", "--windows", "8", "--slide_tol", "2"], "--slide_tol"),
    ("tail_bench.py", ["--seed_bases", TOP], "--seed_bases"),
    ("tail_bench.py", ["--seed_bases", f"100,{2 ** 64 - 5}"], "--seed_bases"),
    ("tail_bench.py", ["--seed_bases", ""], "--seed_bases"),
    ("tail_bench.py", ["--seed_bases", "5"], "--seed_bases"),
    ("stop_sweep.py", ["--seed_bases", "100,100"], "--seed_bases"),
    ("stop_sweep.py", ["--seed_bases", "a"], "--seed_bases"),
    ("stop_sweep.py", ["--stop_tols", "0.03,x"], "--stop_tols"),
    ("stop_sweep.py", ["--stop_tols", "0"], "--stop_tols"),
    ("stop_sweep.py", ["--stop_ratios", "nan"], "--stop_ratios"),
    # a size given twice was computed twice and recorded once; one above T = 100 ran as T under its own name
    ("stop_bench.py", ["--quick", "--windows", "8", "8"], "--windows"),
    ("stop_bench.py", ["--quick", "--windows", "100", "150"], "--windows"),
    ("stop_sweep.py", ["--stop_tols", "0.03,0.03"], "--stop_tols"),
])
def test_stop_and_tail_bad_flags(files, script, argv, flag):
    refused(files, script, argv + ["--out", files / "out.json"], 2, [flag])


# interrupted runs are one line, exit 130, and leave nothing
def interrupt(script, argv, ready):
    """Start script, wait until ready(process) says it works, then Ctrl-C it: (exit code, its one line)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ready(proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, one_line(script, err)


def printed(text):
    def ready(proc):
        for line in proc.stdout:
            if text in line:
                return
        raise AssertionError(f"{text!r} never printed: {proc.stderr.read()[-3000:]}")
    return ready


def loaded(proc):
    """torch is loaded and two seconds more have passed: the run is past its imports (a full tail_bench run takes
    minutes, so it is still working)."""
    for _ in range(600):
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.1)
    time.sleep(2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]


def test_interrupted_speed_bench(tmp_path):
    code, line = interrupt("speed_bench.py", ["--quick", "--out", tmp_path / "speed.json"], printed("CPU,"))
    assert code == 130 and line == "speed_bench.py: interrupted (nothing written)", (code, line)
    assert not os.listdir(tmp_path)


def test_interrupted_tail_bench(tmp_path):
    # not --quick: it prints nothing until it has solved everything, and its quick run can end before the signal
    code, line = interrupt("tail_bench.py", ["--seed_bases", "200", "--out", tmp_path / "tail.json"], loaded)
    assert code == 130 and line == "tail_bench.py: interrupted (nothing written)", (code, line)
    assert not os.listdir(tmp_path)


def test_interrupted_sample_sets_leave_only_the_users_files(tmp_path):
    out = tmp_path / "sets"
    out.mkdir()
    (out / "mine.npz").write_text("the user's")
    argv = [*SD_SETS, "--num_samples", "40", "--timesteps", "4", "--iterations", "2", "--out_dir", out]
    code, line = interrupt("sample_sets.py", argv, printed("samples 1 / 40"))
    assert code == 130 and line == "sample_sets.py: interrupted (nothing written)", (code, line)
    assert os.listdir(out) == ["mine.npz"] and (out / "mine.npz").read_text() == "the user's"


def test_a_failed_sample_sets_run_removes_the_folders_it_created(tmp_path):
    proc = run("sample_sets.py", *SD_SETS, "--cfg_scale", "1e38", "--out_dir", tmp_path / "new" / "sets")
    assert proc.returncode == 1 and "non-finite" in one_line("sample_sets.py", proc.stderr)
    assert not os.listdir(tmp_path)


# the scripts' checks of --cfg_scale, --dist_timeout and --negative_prompt
@pytest.mark.parametrize("script, argv, flag", [
    ("dit_bench.py", DIT + ["--cfg_scale", "inf"], "--cfg_scale"),
    ("dit_bench.py", DIT + ["--cfg_scale", "nan"], "--cfg_scale"),
    ("dit_bench.py", DIT + ["--dist_timeout", "0"], "--dist_timeout"),
    ("sd_bench.py", DIT + ["--cfg_scale", "1", "--negative_prompt", "x"], "--negative_prompt"),
    ("sample_sets.py", SETS + ["--cfg_scale", "nan"], "--cfg_scale"),
])
def test_guidance_and_timeout_checked_as_the_scripts_do(files, script, argv, flag):
    out = ["--out_dir", files / "sets"] if script == "sample_sets.py" else ["--out", files / "out.json"]
    refused(files, script, argv + out, 2, [flag])


def test_prompt_file_not_text(files):
    (files / "prompts.txt").write_bytes(b"\xff\xfe a handwritten digit one\n")
    refused(files, "sd_bench.py", DIT + ["--prompt_file", files / "prompts.txt", "--out", files / "sd.json"], 1,
            ["--prompt_file", "prompts.txt", "UTF-8"])


def test_prompt_file_byte_order_mark_and_invisible_lines(files, capsys):
    """A byte-order mark is not part of the first prompt, and a line made only of invisible characters is a blank
    line (the scripts refuse such a --prompt); an empty --prompt_file is refused, not read as none given."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import sd_bench
    (files / "prompts.txt").write_text("\ufeffa handwritten digit one\n\u200b\n\x00\x00\n  \nseven\n", encoding="utf-8")
    args = sd_bench.parse_args(["--prompt_file", str(files / "prompts.txt"), "--out", str(files / "sd.json")])
    sd_bench.check_model_flags(args)
    assert args.prompts == ["a handwritten digit one", "seven"]
    capsys.readouterr()
    # more prompts than samples: the first are sampled, and said (they were dropped without a word)
    args = sd_bench.parse_args(["--prompt_file", str(files / "prompts.txt"), "--num_samples", "1",
                                "--out", str(files / "sd.json")])
    sd_bench.check_bench_flags(args)
    sd_bench.check_model_flags(args)
    assert "2 prompts given; the first 1 (--num_samples) are sampled" in capsys.readouterr().err
    refused(files, "sd_bench.py", DIT + ["--prompt_file", "", "--out", files / "sd.json"], 2,
            ["--prompt_file", "must not be empty"])


def test_dit_bench_repeated_timesteps(files):
    refused(files, "dit_bench.py", DIT[:1] + ["--timesteps", "3", "3", "--num_samples", "1", "--no-ablation",
                                              "--out", files / "dit.json"], 2, ["--timesteps", "repeat"])


@pytest.fixture
def global_torch_state():
    """speed_bench.main turns gradients off for the process: back on for the other tests."""
    yield
    torch.set_grad_enabled(True)


def test_speed_bench_records_the_flags_given(tmp_path, monkeypatch, global_torch_state):
    from benchmarks import speed_bench
    out = tmp_path / "speed.json"
    gpu = os.path.join(ROOT, "benchmarks", "results", "gpu_h100.json")
    argv = ["benchmarks/speed_bench.py", "--repeats", "3", "--gpu", gpu, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(speed_bench, "cpu_table", lambda *a: {})  # the minutes of CPU timing are not the point
    speed_bench.main(argparse.Namespace(quick=False, repeats=3, gpu=gpu, out=str(out), machine="m",
                                        malloc_as_is=True))
    with open(out) as f:
        assert json.load(f)["command"] == "python " + shlex.join(argv)


def test_a_tilde_in_a_path_flag_is_the_home_folder(tmp_path):
    """--out=~/x.json: the shell leaves a ~ after "=" as it is, and the report went to a folder named "~" in the
    working directory (the scripts' --output_path already expanded it)."""
    cwd, results = tmp_path / "cwd", os.path.join(ROOT, "benchmarks", "results")
    cwd.mkdir()
    inputs = [f"--{flag}={os.path.join(results, name)}" for flag, name in
              (("gpu", "gpu_h200_windows.json"), ("dit", "dit.json"), ("sd", "sd.json"))]
    proc = run("gpu_estimate.py", *inputs, "--out=~/estimate.json", env={**os.environ, "HOME": str(tmp_path)},
               cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "estimate.json").is_file() and os.listdir(cwd) == []
    import benchmarks.figures as figures
    import benchmarks.sample_sets as sample_sets
    home = os.path.expanduser("~")
    assert figures.parse_args(["--out_dir=~/figs"]).out_dir == os.path.join(home, "figs")
    args = sample_sets.parse_args(SETS + ["--out_dir=~/sets", "--summary=~/sets.json"])
    assert (args.out_dir, args.summary) == (os.path.join(home, "sets"), os.path.join(home, "sets.json"))


# a rule the solver refuses (SolverConfig: stop_tol below 1) was replayed and written, after minutes of solves
@pytest.mark.parametrize("argv", [["--stop_tols", "1"], ["--stop_tols", "0.03,5"]])
def test_stop_sweep_refuses_what_the_solver_refuses(files, argv):
    refused(files, "stop_sweep.py", ["--quick", "--seed_bases", "200", *argv, "--out", files / "out.json"], 2,
            [argv[0], "stop_tol must be below 1"])


def test_stop_sweep_takes_what_the_solver_takes():
    """Each value goes through SolverConfig's own check: a stop_ratio up to 1 is one the solver takes, above 1 not
    (a growing error would pass the rule's contraction test)."""
    from benchmarks.stop_sweep import number_list
    from runner.errors import UsageError
    assert number_list("0.35,1", "--stop_ratios", "stop_ratio") == [0.35, 1.0]
    with pytest.raises(UsageError, match="--stop_ratios: stop_ratio must be at most 1"):
        number_list("0.35,2", "--stop_ratios", "stop_ratio")


def test_dit_bench_more_class_labels_than_samples(files):
    """The labels past --num_samples were dropped without a word (parallel_dit.py refuses them)."""
    refused(files, "dit_bench.py", DIT + ["--class_labels", "0", "1", "--out", files / "dit.json"], 2,
            ["--class_labels", "--num_samples 1"])


# 10**20 GPUs was taken (and named a column of the JSON); beyond a window's steps more GPUs change nothing
@pytest.mark.parametrize("gpus", ["4097", str(10 ** 20)])
def test_gpu_estimate_gpus_at_most_4096(files, gpus):
    refused(files, "gpu_estimate.py", ["--gpus", gpus, "--out", files / "estimate.json"], 2,
            ["--gpus", "1..4096", gpus])


# --smoke times tiny models at fixed sizes: a GPU run's size beside it was ignored (--repeats 3 timed twice)
@pytest.mark.parametrize("argv, flag", [(["--repeats", "3"], "--repeats"), (["--window_runs"], "--window_runs")])
def test_gpu_bench_smoke_refuses_the_sizes_of_a_gpu_run(files, argv, flag):
    refused(files, "gpu_bench.py", ["--smoke", *argv, "--out", files / "gpu.json"], 2, [flag, "--smoke"])


# an empty input path is a usage error (exit 2), as every other blank path flag is, not a file not found (exit 1)
@pytest.mark.parametrize("script, flag", [("speed_bench.py", "--gpu"), ("gpu_estimate.py", "--dit")])
def test_empty_input_path(files, script, flag):
    refused(files, script, ["--quick", flag, "", "--out", files / "out.json"] if script == "speed_bench.py"
            else [flag, "", "--out", files / "out.json"], 2, [flag, "must not be empty"])


@pytest.mark.parametrize("script", ["gpu_bench.py", "gpu_scripts.py"])
def test_the_gpu_scripts_need_a_gpu_or_smoke(files, script, monkeypatch):
    """Without a GPU and without --smoke, gpu_bench.py timed the full-size models in float32 on the CPU (minutes a
    call) and labelled the run "cpu (smoke)"; refused in one line, after the flags (as if on a machine without one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(files, script, ["--out", files / "g.json"], 2, ["no GPU is visible", "--smoke"])
