"""Every solver parameter in one place: its default, its check and its help text.

`solve` takes a SolverConfig; the scripts generate their flags from its fields (runner/flags.py) and record the
resolved config in metrics.json. A new knob is one field here and its use in the solver.
"""
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

from .equations import FORMS


def is_integer(value):
    """An integer (Python's or numpy's) that is not a bool (True would otherwise pass as 1): how every count of the
    package is checked."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    """A real number (Python's or numpy's, integers included) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _param(default, help, kind, choices=None):
    """kind: "int" (an integer >= 1), "count" (an integer >= 1 or None), "window" (a count or "auto"), "float" (a
    finite number >= 0), "choice" (one of choices), "bool"."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass(frozen=True)
class SolverConfig:
    window_size: int = _param(None, "states evaluated per sample per iteration: a number (above T means T), or "
                                    "auto: chosen from the model's measured cost on this hardware (planner.py); "
                                    "default: T", "window")
    order: int = _param(None, "order k of the equations: 1 is Jacobi-like, window_size (the default) Picard-like "
                              "(an order above the window acts as the window)", "count")
    equations: str = _param("picard", "form of the order-k equations: picard (sum of drifts, fewer iterations) or "
                                      "ddim (the paper's DDIM composition); same solution either way", "choice", FORMS)
    memory_size: int = _param(3, "TAA memory m: iterates kept per state (1: plain fixed-point iteration; 2-5 "
                                 "recommended; more than T acts as T)", "int")
    lam: float = _param(1e-3, "regulariser lambda of the TAA least-squares problems", "float")
    tol1: float = _param(1e-4, "absolute tolerance on the RMS residual of a state", "float")
    tol2: float = _param(1e-4, "tolerance relative to the step's noise level sigma", "float")
    slide_tol: float = _param(0.0, "opt-in, trades exactness for speed at small windows: while the window is short "
                                   "of x_0, a state also freezes with an RMS residual up to slide_tol T / (100 "
                                   "window_size). 8e-3 saves 14-18% of the iterations at window 8, and ended 1 of 30 "
                                   "held-out text-to-image samples 2-8 gray levels off at every window tried "
                                   "(BENCHMARKS.md, section 1); 0: off", "float")
    block_tol: float = _param(1.0, "while the window slides, the states one iteration freezes together may carry at "
                                   "most block_tol x their tolerance in all (residual over tolerance, summed over the "
                                   "block; states near the model's round-off floor do not count): their defects add "
                                   "up; 0: each state alone", "float")
    settle: float = _param(0.1, "once the window reaches x_0, a state freezes only at an RMS residual <= settle x its "
                                "tolerance, or at its tolerance once the residual stops halving between iterations "
                                "(the model's round-off floor); 1: the plain per-state test (at most 1)", "float")
    stop_tol: float = _param(0.025, "stop rule: stop once the window reaches x_0 and the estimate E of x_0's "
                                    "remaining error is <= stop_tol * std(x_0) (and contracting, stop_ratio); 0: off; "
                                    "off also when tol1 = tol2 = 0, so that tolerance 0 solves exactly", "float")
    stop_ratio: float = _param(0.35, "stop rule: E must also be <= stop_ratio * the previous iteration's E", "float")
    stop_image_tol: float = _param(1.2, "stop rule's image test, where solve is shown the decoded image (image_fn: "
                                        "the scripts and parallel_sample pass it): at the first iteration whose E is "
                                        "contracting and above stop_tol but at most 0.07, and at every stop by E, stop "
                                        "only if the image before the update is predicted within stop_image_tol gray "
                                        "levels (RMS) of the final one (the update's image change times E over the "
                                        "update's size); 0: off (E alone decides)", "float")
    taa_guard: float = _param(1.5, "a state whose order-k residual grew by more than this factor since the previous "
                                   "iteration takes the plain step instead of the TAA step (0: off)", "float")
    init_states: str = _param("ddim", "how a state the window reaches first starts: ddim (DDIM steps down from the "
                                      "lowest state in use, noise prediction held at the newest one) or copy (a "
                                      "copy of the lowest state in use); not used with reference_quirks, which "
                                      "refuses an explicit ddim", "choice", ("ddim", "copy"))
    reference_quirks: bool = _param(False, "reproduce the reference implementation's iterates: its start of new states "
                                           "(the lowest at 0, the previous lowest copied over), its oldest TAA "
                                           "columns and its extra update of passed states (docs/ALGORITHM.md, "
                                           "section 9); for comparisons: at windows < T they cost iterations; "
                                           "replaces init_states (an explicit init_states ddim beside it is "
                                           "refused)",
                                    "bool")
    max_steps: int = _param(None, "maximum number of iterations (default: none; T always suffice); with "
                                  "reference_quirks the reference's count, whose first step is the initial state: "
                                  "max_steps - 1 iterations", "count")

    @classmethod
    def paper(cls, **overrides):
        """The reference implementation's algorithm and defaults: the DDIM form, m = 2, tolerances 1e-3, its
        per-state stop, its start of new states, TAA columns and update of passed states, no TAA guard
        (docs/ALGORITHM.md lists what still differs)."""
        return cls._explicit(cls(**{**PAPER, **overrides}), overrides)

    def __post_init__(self):
        self.check()
        for f in fields(self):  # numpy numbers pass the check; stored as Python's, so that metrics.json can hold them
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if kind in ("int", "count", "window") and is_integer(value):
                object.__setattr__(self, f.name, int(value))
            elif kind == "float":
                object.__setattr__(self, f.name, float(value))

    def check(self):
        """ValueError naming the first bad parameter (its message starts with the parameter's name)."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.metadata["kind"]
            if kind in ("count", "window") and value is None or kind == "window" and value == "auto":
                continue
            if kind in ("int", "count", "window"):
                if not is_integer(value) or value < 1:
                    extra = " or auto" if kind == "window" else ""
                    raise ValueError(f"{f.name} must be an integer >= 1{extra}, got {value!r}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
            elif kind == "float":
                if not is_real(value) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"{f.name} must be a finite number >= 0, got {value!r}")
            elif value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        if self.settle > 1:  # the solver tests at settle x the tolerance only below 1: a larger value would run as 1
            raise ValueError(f"settle must be in 0..1 (1: the plain per-state test), got {self.settle!r}")
        # E is x_0's estimated remaining error relative to x_0's own scale: at 1 or more the rule stops as soon as the
        # window reaches x_0, whatever the image (stop_tol 1e3 ended the embedded DiT 54 gray levels off)
        # a state's residual is RMS over a latent of about unit scale: a tolerance of 1 or more passes states that
        # are nowhere near converged (tol1 = tol2 = 1e308 "converged" in one iteration, 27-55 gray levels off)
        for name in ("tol1", "tol2", "slide_tol"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name} must be below 1 (an RMS residual as large as the latent passes every state), "
                                 f"got {getattr(self, name)!r}")
        if self.stop_ratio > 1:  # E must shrink for the rule to stop: above 1 a growing error passes
            raise ValueError(f"stop_ratio must be at most 1 (x_0's estimated error must shrink by this factor between "
                             f"iterations for the rule to stop; above 1 a growing one would pass), got "
                             f"{self.stop_ratio!r}")
        if self.stop_tol >= 1:
            raise ValueError(f"stop_tol must be below 1 (x_0's estimated error relative to its scale; 0: the rule is "
                             f"off), got {self.stop_tol!r}")
        if self.reference_quirks and self.max_steps == 1:  # the initial state is the first step: no model call
            raise ValueError("max_steps must be at least 2 with reference_quirks, which counts as the reference does, "
                             "the initial state as the first step (1 would make no model call), got 1")

    @property
    def exact(self):
        """Tolerance 0 (tol1 = tol2 = 0): the solve ends on the sequential result to round-off; the stop rule is off
        and no state passes before its inputs are final."""
        return self.tol1 == 0 and self.tol2 == 0

    @property
    def max_iterations(self):
        """The model calls max_steps allows (None: no cap). The reference counts the samples its run keeps, the
        initial state first (its output folders hold step_0 ... step_{max_steps - 1}), so it makes max_steps - 1
        calls; reference_quirks counts as it does, so that the reference's example runs (--max_steps 10 and 20)
        take the same iterations here and save as many per-iteration images."""
        return None if self.max_steps is None else self.max_steps - self._initial_counted

    def capped(self, iterations):
        """This config, stopping after `iterations` model calls however max_steps is counted."""
        return replace(self, max_steps=iterations + self._initial_counted)

    @property
    def _initial_counted(self):
        """1 when max_steps counts the initial state as a step (reference_quirks), else 0."""
        return int(self.reference_quirks)

    def ignores_init_states(self, given):
        """Whether an init_states given explicitly (None: left at its default) would change nothing:
        reference_quirks starts new states as the reference does whatever init_states says (copy is let through:
        the reference's start copies states too, and the paper mode sets it)."""
        return self.reference_quirks and given not in (None, "copy")

    def resolve(self, T):
        """The values used for T steps: window_size defaults to T and is capped at T; order defaults to the window
        and is capped at it (u = min(s + k, F) in equation (2) makes every order above the window the same);
        memory_size is capped at T."""
        memory = min(self.memory_size, T)  # a state is in the window for at most T iterations: more never fills
        if self.window_size == "auto":     # chosen by the planner before solving; the order follows it
            return replace(self, order=None if self.order is None else min(self.order, T), memory_size=memory)
        window = min(self.window_size or T, T)
        order = min(self.order or window, window)
        if self.reference_quirks and (self.window_size or T) > T:
            # the reference's window above T starts every state at x_T in the first iteration, x_0 included (at
            # window T x_0 starts at 0): a difference in the iterates, so the window given is kept; it evaluates
            # the same states as window T
            window = self.window_size
        return replace(self, window_size=window, order=order, memory_size=memory)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def with_overrides(cls, config, overrides, caller):
        """config (a SolverConfig, or None for the defaults) with keyword overrides of its fields: what `solve` and
        the other entry points taking `config=..., **solver_fields` do; TypeError naming caller otherwise."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a SolverConfig (or its fields as keywords), got {type(config).__name__}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{caller}() got unknown solver parameters {unknown} (see paratAA.SolverConfig)")
        return cls._explicit(replace(config or cls(), **overrides), overrides)

    @staticmethod
    def _explicit(config, overrides):
        """config, or ValueError for a field given in overrides that another field would override without a word:
        reference_quirks starts new states as the reference does whatever init_states says, so an explicit
        init_states="ddim" beside it ran as if it were left out. Only the keywords tell an explicit value from the
        default (the same "ddim"), so SolverConfig(reference_quirks=True) itself is accepted, as before; copy is let
        through (the reference's start copies states too, and paper() sets it)."""
        if config.ignores_init_states(overrides.get("init_states")):
            raise ValueError(f"init_states {config.init_states!r} has no effect with reference_quirks=True, which "
                             f"starts new states as the reference does whatever init_states says: leave out one of "
                             f"the two")
        return config


PAPER = dict(equations="ddim", memory_size=2, tol1=1e-3, tol2=1e-3, stop_tol=0.0, slide_tol=0.0, block_tol=0.0,
             settle=1.0, taa_guard=0.0, init_states="copy", reference_quirks=True)
