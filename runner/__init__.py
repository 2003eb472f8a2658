"""The run layer around the solver: what the three scripts and the benchmarks share, and nothing of the algorithm.

    errors    error types, exit codes, the one-line handler and signals
    launch    the process group (accelerate), the device, the sharding of model calls
    flags     the scripts' flags: the solver's (from paratAA.SolverConfig) and the run's, checked before loading
    loop      Bundle (what a model gives the loop) and the batch loop
    rundir    run folder naming and files written atomically
    writer    the run writer: metrics.json, latents.npz, per-iteration images, grid.png
    metrics   "same image" and distances to the sequential sample
"""
