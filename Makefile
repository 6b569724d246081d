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

bench: run
	$(UV) run python bench/run.py
	$(UV) run python bench/load.py

# Kills PgBouncer, PostgreSQL, Redis, the audit consumer and an API worker of
# the service make run started, one after another under load, and checks that
# each came back by itself and nothing acknowledged was lost (bench/chaos.py).
chaos: run
	$(UV) run python bench/chaos.py

stop:
	@if command -v $(UV) >/dev/null && [ -d .venv ]; then $(UV) run rewards down; fi
