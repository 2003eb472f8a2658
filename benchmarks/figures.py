"""The paper's figures, drawn from the JSON that dit_bench.py and sd_bench.py write; no model runs here.

    python benchmarks/figures.py [--dit benchmarks/results/dit.json] [--sd benchmarks/results/sd.json] [--quick]
    python benchmarks/figures.py --dit results/dit_xl2.json --sd results/sd15.json --out_dir results/figures

Each JSON gets its panel (titled by the model it measured). Without --dit and --sd the default pair is drawn (what
`make bench` writes; a missing one is skipped); with either flag only the files the flags name, each of which must
exist. Every JSON is checked by drawing its panels in memory first: a file they cannot be drawn from is named, and
nothing is written.
(a) distance to the sequential sample vs iteration, one curve per method      -> fig_a_distance.png
(b) image evolution: decoded x_0 estimate per iteration, FP / FP+ / ParaTAA   -> fig_b_evolution.png
    (from <json>.evolution.npz, written beside the JSON)
(c) window size: iterations and model evaluations vs window_size             -> fig_c_window.png
(d) ablation over order and memory size (iterations to the same image)        -> fig_d_ablation.png
    (dit_bench.py runs it; sd_bench.py with --ablation)
(e) warm start: iterations vs variation_steps (the SD JSON)                   -> fig_e_warm_start.png
(f) quality vs iteration: classifier agreement after k iterations (embedded   -> fig_f_quality.png
    models); for other models, the fraction of samples whose estimate is already the sequential image (their
    FID, IS or CLIP score after k iterations comes from sample_sets.py's per-iteration sets)
"""
import io
import os
import pathlib
import sys
import zipfile

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.convergence import check_out_dir  # noqa: E402
from models.sd import read_json  # noqa: E402
from runner.errors import InputFileError, exit_on_error  # noqa: E402
from runner.flags import home_path, make_parser, path_value  # noqa: E402
from runner.metrics import SAME_IMAGE  # noqa: E402
from runner.rundir import write_atomic, upscale  # noqa: E402

# curves drawn: both forms of the equations (see paratAA/equations.py) for FP+ and ParaTAA at m = 3
METHODS = ["FP", "FP+ (ddim)", "FP+ (picard)", "ParaTAA m=3 (ddim)", "ParaTAA m=3"]
STYLE = {"FP": ("tab:gray", "-"), "FP+ (ddim)": ("tab:blue", "--"), "FP+ (picard)": ("tab:blue", "-"),
         "ParaTAA m=3 (ddim)": ("tab:red", "--"), "ParaTAA m=3": ("tab:red", "-")}
DEFAULT_REPORTS = ("benchmarks/results/dit.json", "benchmarks/results/sd.json")  # drawn when no report is named
EVOLUTION_ROWS = ["FP", "FP+ (ddim)", "ParaTAA m=3 (ddim)", "FP+ (picard)", "ParaTAA m=3"]


def label(name, report):
    """Every method named with its form ("ParaTAA m=3" is in the run's default form)."""
    form = report.get("defaults", {}).get("equations", "picard")
    return name if name.endswith(")") or name == "FP" else f"{name} ({form})"


def largest_T(report):
    return max(int(t) for t in report["methods"] if t.isdigit())  # the largest T benchmarked (eta 0)


def padded(histories):
    """[samples, longest] with each history carried on at its last value (the estimate stops changing)."""
    n = max(len(h) for h in histories)
    return np.array([h + [h[-1]] * (n - len(h)) for h in histories], dtype=float)


def distance(report, sample):
    return "RMS latent distance to sequential", True, np.median, sample["distance_history"]


def quality(report, sample):
    """Classifier agreement where the JSON has it; else whether the estimate is the sequential image."""
    if "agreement_history" in sample:
        return "classifier agreement (mean)", False, np.mean, [float(v) for v in sample["agreement_history"]]
    return ("samples at the sequential image (fraction)", False, np.mean,
            [float(v <= SAME_IMAGE) for v in sample["image_rms_history"]])


def fig_curves(results, quantity, path):
    """One panel per JSON, one curve per method over the iterations at the JSON's largest T."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (title, res) in zip(axes[0], results.items()):
        T = largest_T(res)
        block = res["methods"][str(T)]
        ylabel, log = "", False
        for name in METHODS:
            if name in block:
                per = [quantity(res, s) for s in block[name]["samples"]]
                ylabel, log, reduce = per[0][:3]
                y = reduce(padded([p[3] for p in per]), axis=0)
                color, ls = STYLE[name]
                ax.plot(np.arange(len(y)), y, label=label(name, res), marker=".", color=color, ls=ls)
        ax.set_title(f"{title}, T = {T}")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_window(results, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for title, res in results.items():
        ws = sorted(int(w) for w in res["window_sweep"])
        rows = [res["window_sweep"][str(w)] for w in ws]
        axes[0].plot(ws, [r["stop_median"] for r in rows], marker="o", label=f"{title}: stop")
        axes[0].plot(ws, [r["same_median"] for r in rows], marker="x", ls="--", label=f"{title}: same image")
        axes[1].plot(ws, [r["evaluations_mean"] for r in rows], marker="o", label=title)
    axes[0].set_ylabel("iterations (median)")
    axes[1].set_ylabel("model evaluations per sample")
    for ax in axes:
        ax.set_xlabel("window_size (largest T benchmarked)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_warm(results, path):
    """One panel per JSON with a warm-start table, titled by its model and T; a pair's warm and cold start in one
    colour (solid, dotted)."""
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, (title, res) in zip(axes[0], results.items()):
        pairs = {}
        for key, s in res["warm_start"].items():
            name, v = key.rsplit(" V=", 1)
            pairs.setdefault(name, []).append((int(v), s["stop_median"], s["cold_median"]))
        for n, (name, rows) in enumerate(pairs.items()):
            rows.sort()
            color = f"C{n % 10}"
            ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", color=color, label=f"warm: {name}")
            ax.plot([r[0] for r in rows], [r[2] for r in rows], ls=":", color=color, label=f"cold start: {name}")
        ax.set_title(f"{title}, T = {largest_T(res)}")  # the warm start runs at the largest T (sd_bench.py)
        ax.set_xlabel("variation_steps")
        ax.set_ylabel("prompt2 iterations (median)")
        ax.grid(alpha=0.3)
        # below the axes: a pair is named by its prompts, wider than the panel for real ones (section 10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


class NonFiniteArray(InputFileError):
    """A NaN or an infinity in an array of an .evolution.npz (exit 1, as a NaN in the JSON); main names the flag."""


def evolution_images(res, json_path):
    """{method: uint8 [K+1, H, W, 3]} from the JSON's side file. A NaN or an infinity in a float array is refused
    naming the file and the array, as read_json refuses a NaN in the JSON: drawn, it was a figure with no word."""
    evo = res["evolution"]
    path = os.path.join(os.path.dirname(json_path), evo["file"])
    with np.load(path) as z:
        images = {name: z[key] for name, key in evo["arrays"].items()}
    for name, key in evo["arrays"].items():
        a = images[name]
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            what = "NaN" if np.isnan(a).any() else "an infinity"
            raise NonFiniteArray(f"{path} has {what} in array {key} ({name}): finite pixel values are needed")
    return images


def evolution_cells(lengths, columns=None):
    """Figure (b)'s columns and, per row of stored images (iterations 0 .. K), the iterations drawn: every stored
    one, at most `columns` (the first 20 of 21 were drawn, the last stored iteration left out), and nothing after a
    row's last: a method that stopped early repeated its final image, which read as more iterations."""
    n = max(lengths) if columns is None else min(columns, max(lengths))
    return n, [range(min(length, n)) for length in lengths]


def fig_evolution(results, paths, path, columns=None):
    """Rows: methods (for each JSON); columns: the decoded estimate after iteration k = 0, 1, ... (every stored
    iteration, or the first `columns`)."""
    rows = []
    for title, res in results.items():
        images = evolution_images(res, paths[title])
        evo = res["evolution"]
        rows.append((f"{title}: sample {evo['sample']} ({str(evo['label'])[:40]}), T = {evo['T']}", None))  # caption
        rows += [(label(name, res), images[name]) for name in EVOLUTION_ROWS if name in images]
    columns, drawn = evolution_cells([0 if imgs is None else len(imgs) for _, imgs in rows], columns)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.6 + 1.2, len(rows) * 0.7), squeeze=False)
    fig.subplots_adjust(left=1.1 / (columns * 0.6 + 1.2), right=0.98, top=0.93, bottom=0.02)
    for r, (name, imgs) in enumerate(rows):
        for k in range(columns):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if imgs is None or k not in drawn[r]:
                ax.axis("off")
                continue
            ax.imshow(upscale(imgs[k]), interpolation="nearest")
            if k == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
            ax.set_title(str(k), fontsize=5, pad=1)  # the iteration
        if imgs is None:
            axes[r, 0].text(0, 0.2, name, fontsize=6, transform=axes[r, 0].transAxes)
    fig.suptitle("decoded x_0 estimate after iteration k", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_ablation(results, path):
    """One heat map per model and form of the equations: iterations to the same image over order x memory_size."""
    rows = list(results.items())
    forms = rows[0][1]["ablation"]["forms"]
    widest = max(len(r["ablation"]["orders"]) for _, r in rows)
    tallest = max(len(r["ablation"]["memories"]) for _, r in rows)
    fig, axes = plt.subplots(len(rows), len(forms), squeeze=False,
                             figsize=(2 + 1.6 * widest, (0.9 + 0.6 * tallest) * len(rows)))
    for (title, res), ax_row in zip(rows, axes):
        ab = res["ablation"]
        T, orders, memories = ab["T"], ab["orders"], ab["memories"]
        for ax, form in zip(ax_row, ab["forms"]):
            grid = np.array([[ab["cells"][f"{form} order={k} m={m}"]["same_median"] for k in orders]
                             for m in memories], dtype=float)
            im = ax.imshow(grid, cmap="viridis_r", vmin=0, vmax=T)
            ax.set_xticks(range(len(orders)), [str(o) for o in orders])
            ax.set_yticks(range(len(memories)), [str(m) for m in memories])
            ax.set_xlabel("order")
            ax.set_ylabel("memory_size")
            for i in range(len(memories)):
                for j in range(len(orders)):
                    ax.text(j, i, f"{grid[i, j]:g}", ha="center", va="center", color="w", fontsize=7)
            ax.set_title(f"{title}\n{form} form, T = window = {T}", fontsize=7)
        fig.colorbar(im, ax=list(ax_row))
    fig.suptitle("iterations to the same image (median)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path, flag, role, given):
    """(title, report) of one benchmark JSON, or None when it is not drawn: a default that is absent. A file a flag
    names must exist: skipped, a mistyped path left the run's figures without its panels, with exit 0."""
    if path is None:
        return None
    if not os.path.lexists(path):
        if given:
            raise InputFileError(f"{flag}: {path} not found")
        print(f"{role}: {path} not found, skipped")
        return None
    report = read_json(path, flag)
    title = report.get("model", {}) if isinstance(report.get("model"), dict) else {}
    return str(title.get("title", f"embedded {role}")), report


def reports(args):
    """(role, flag, path, given) of each report to draw. Without --dit and --sd, the default pair (make bench's);
    with either, only what the flags name: the other's default beside it drew the committed embedded model's panels
    into a checkpoint's figures, its warm start as figure (e)."""
    given = args.dit is not None or args.sd is not None
    paths = (args.dit, args.sd) if given else DEFAULT_REPORTS
    return [("DiT", "--dit", paths[0], given), ("text-to-image", "--sd", paths[1], given)]


FIGURES = ("fig_a_distance.png", "fig_b_evolution.png", "fig_c_window.png", "fig_d_ablation.png",
           "fig_e_warm_start.png", "fig_f_quality.png")  # every file draw() can write


def draw(results, paths, quick, say=print):
    """Every figure the reports allow, in memory: {file name: PNG bytes}."""
    files = {}

    def out(name):
        files[name] = io.BytesIO()
        return files[name]
    fig_curves(results, distance, out("fig_a_distance.png"))
    evolved = {t: r for t, r in results.items() if r.get("evolution", {}).get("file")}
    if evolved:
        fig_evolution(evolved, paths, out("fig_b_evolution.png"), 12 if quick else None)
    else:
        say("(b) skipped: no JSON has per-iteration images (written by the current dit_bench.py / sd_bench.py)")
    fig_window(results, out("fig_c_window.png"))
    ablated = {t: r for t, r in results.items() if r.get("ablation")}
    if ablated:
        fig_ablation(ablated, out("fig_d_ablation.png"))
    else:
        say("(d) skipped: no JSON has an ablation (dit_bench.py runs it; sd_bench.py with --ablation)")
    warm = {t: r for t, r in results.items() if r.get("warm_start")}
    if warm:
        fig_warm(warm, out("fig_e_warm_start.png"))
    else:
        say("(e) skipped: no JSON has a warm-start table (sd_bench.py with two prompts or more)")
    fig_curves(results, quality, out("fig_f_quality.png"))
    return {name: f.getvalue() for name, f in files.items()}


def main(args):
    check_out_dir(args.out_dir, "--out_dir")
    results, paths = {}, {}
    for role, flag, path, given in reports(args):
        found = load(path, flag, role, given)
        if not found:
            continue
        title = found[0] if found[0] not in results else f"{found[0]} ({role})"
        try:  # its panels alone, before anything is written: a report they cannot be drawn from is named
            draw({title: found[1]}, {title: path}, args.quick, say=lambda text: None)
        except NonFiniteArray as e:
            raise InputFileError(f"{flag}: {e}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OSError, zipfile.BadZipFile) as e:
            first = (str(e).splitlines() or [""])[0]
            what = f"has no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {first}"
            raise InputFileError(f"{flag}: {path} is not a report of dit_bench.py / sd_bench.py that figures.py can "
                                 f"draw ({what})") from None
        finally:
            plt.close("all")
        results[title], paths[title] = found[1], path
    if not results:
        raise InputFileError("no benchmark JSON found (run dit_bench.py or sd_bench.py first)")
    files = draw(results, paths, args.quick)
    for name in FIGURES:  # every target checked before the first is written: the set is written whole
        target = os.path.join(args.out_dir, name)
        if os.path.isdir(target) or (os.path.lexists(target) and not os.access(target, os.W_OK)):
            raise InputFileError(f"--out_dir: {target} is a folder or not writable: no figure written")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, data in files.items():
        write_atomic(os.path.join(args.out_dir, name), lambda p, data=data: pathlib.Path(p).write_bytes(data))
    for name in FIGURES:  # a figure skipped this time: an older one of that name would pass for this run's
        stale = os.path.join(args.out_dir, name)
        if name not in files and os.path.lexists(stale):
            os.remove(stale)
            print(f"removed {stale}: an earlier run's, not drawn from these reports")
    print(f"wrote figures to {args.out_dir}")


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="12 columns in figure (b) instead of every stored iteration")
    parser.add_argument("--dit", type=path_value, default=None,
                        help=f"dit_bench.py's JSON (without --dit and --sd: {' and '.join(DEFAULT_REPORTS)})")
    parser.add_argument("--sd", type=path_value, default=None, help="sd_bench.py's JSON")
    parser.add_argument("--out_dir", type=home_path, default="benchmarks/figures")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
