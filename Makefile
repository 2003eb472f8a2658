# Two commands on a fresh machine:  make demo  (sample with the embedded model)  and  make test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench bench-quick train-embedded clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) parallel_dit.py --num_samples 10 --class_labels 0 1 2 3 4 5 6 7 8 9 --compare_sequential

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=25

# the solver's properties only (configuration, exactness, the T bound, sharding, schedules): under 90 s here
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q tests/test_config.py tests/test_solver.py tests/test_schedule.py tests/test_sharding.py

# the figures are drawn from the JSON (and its .evolution.npz) that dit_bench.py and sd_bench.py write; the sample
# sets (the images FID / CLIP-score tools read) go to benchmarks/results/tmp/, their summaries next to the JSON
bench: $(VENV)/.installed
	$(PY) benchmarks/solver_bench.py
	$(PY) benchmarks/dit_bench.py
	$(PY) benchmarks/sd_bench.py
	$(PY) benchmarks/figures.py
	$(PY) benchmarks/gpu_estimate.py
	$(PY) benchmarks/sample_sets.py dit --num_samples 50 --batch_size 10 --iterations 1 2 3 4 5 6 8 10 \
		--summary benchmarks/results/sample_sets_dit.json
	$(PY) benchmarks/sample_sets.py sd --num_samples 20 --batch_size 10 --iterations 1 2 3 4 5 6 8 10 \
		--summary benchmarks/results/sample_sets_sd.json
	$(PY) benchmarks/sd_bench.py --model_path models/embedded/flow --timesteps 50 --out benchmarks/results/flow.json
	$(PY) benchmarks/stop_bench.py
	for b in 300 500 700 1100 1300 1500; do $(PY) benchmarks/stop_bench.py --seed_base $$b --out benchmarks/results/stop_seed$$b.json; done
	for b in 1100 1300 1500; do $(PY) benchmarks/stop_bench.py --seed_base $$b --windows 4 8 16 32 100 --out benchmarks/results/slide_seed$$b.json; done
	for b in 2000 2010 2020 2030; do $(PY) benchmarks/stop_bench.py --seed_base $$b --windows 8 16 32 --out benchmarks/results/window_seed$$b.json; done
	$(PY) benchmarks/stop_sweep.py --seed_bases 100,300,500,700,1100,1300,1500,2040,2050,2060,2070,2080,2100,2120 \
		--stop_tols 0.025,0.03,0.035,0.04 --stop_ratios 0.35,0.5
	$(PY) benchmarks/stop_sweep.py --seed_bases 2140,2150,2160,2170,2180,2190 --stop_tols 0.03,0.035,0.04 \
		--stop_ratios 0.35 --out benchmarks/results/stop_sweep_seed2140.json
	$(PY) benchmarks/settle_gpu.py --out benchmarks/results/settle_cpu.json
	$(PY) benchmarks/tail_bench.py
	$(PY) benchmarks/speed_bench.py

bench-quick: $(VENV)/.installed
	$(PY) benchmarks/solver_bench.py --quick --out benchmarks/results/tmp/solver.json
	$(PY) benchmarks/dit_bench.py --quick --out benchmarks/results/tmp/dit.json
	$(PY) benchmarks/sd_bench.py --quick --out benchmarks/results/tmp/sd.json
	$(PY) benchmarks/figures.py --quick --dit benchmarks/results/tmp/dit.json --sd benchmarks/results/tmp/sd.json \
		--out_dir benchmarks/results/tmp/figures
	$(PY) benchmarks/gpu_estimate.py --dit benchmarks/results/tmp/dit.json --sd benchmarks/results/tmp/sd.json \
		--out benchmarks/results/tmp/gpu_estimate.json
	$(PY) benchmarks/sample_sets.py dit --quick --iterations 1 3 --out_dir benchmarks/results/tmp/sample_sets_dit
	$(PY) benchmarks/sample_sets.py sd --quick --iterations 1 3 --out_dir benchmarks/results/tmp/sample_sets_sd

train-embedded: $(VENV)/.installed
	$(PY) -m training.train_embedded
	$(PY) -m training.train_text2img
	$(PY) -m training.train_flow

clean-venv:
	rm -rf $(VENV)
