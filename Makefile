# The README's commands. Each one installs what is missing first, so any of
# them works on a fresh Debian 12 machine as root.
UV := uv

.PHONY: install run test bench chaos stop

install:
	bash ops/install.sh

run: install
	$(UV) run rewards up

# Every test twice: on the single node `make run` started, then on a Citus
# coordinator with two workers (skipped, saying why, without the extension).
test: run
	$(UV) run pytest
	bash ops/test-citus.sh

# Each point BENCH_SECONDS long (3 interleaved rounds of bench/run.py and
# bench/load.py, one pass of bench/sweep.py over 1-512 connections), then
# bench/report.md and its plots from what they wrote to bench/out/.
# BENCH_CITUS_SWEEP: bench/sweep.py's JSON from a Citus cluster, for the
# report's scale model (README "Benchmarks").
BENCH_SECONDS ?= 5
BENCH_CITUS_SWEEP ?=

bench: run
	$(UV) run python bench/run.py --seconds $(BENCH_SECONDS) --json bench/out/run.json
	$(UV) run python bench/load.py --seconds $(BENCH_SECONDS) --json bench/out/load.json
	$(UV) run python bench/sweep.py --seconds $(BENCH_SECONDS) --json bench/out/sweep.json
	$(UV) run python bench/report.py --sweep bench/out/sweep.json --run bench/out/run.json \
	  --load bench/out/load.json $(if $(BENCH_CITUS_SWEEP),--citus-sweep $(BENCH_CITUS_SWEEP)) \
	  --command "make bench BENCH_SECONDS=$(BENCH_SECONDS)$(if $(BENCH_CITUS_SWEEP), BENCH_CITUS_SWEEP=$(BENCH_CITUS_SWEEP))"

# Kills PgBouncer, PostgreSQL, Redis, the audit consumer and an API worker of
# the service make run started, one after another under load, and checks that
# each came back by itself and nothing acknowledged was lost (bench/chaos.py).
chaos: run
	$(UV) run python bench/chaos.py

stop:
	@if command -v $(UV) >/dev/null && [ -d .venv ]; then $(UV) run rewards down; fi
