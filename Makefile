# One Makefile, also used by CI (.ci/run calls `make test`).
.PHONY: help demo install build-dev wheel check-wheel test test-rust test-python bench lint

help:
	@echo "make demo        install and start the guarded example server (SQLite keys + JSONL audit)"
	@echo "make test        every test: cargo test, then pytest against the installed wheel (installs what it needs)"
	@echo "make wheel       build the release wheel (manylinux, abi3) into dist/"
	@echo "make check-wheel install dist/'s wheel into a fresh venv without cargo and use it"
	@echo "make bench       the benchmarks in benches/ (release build), with baselines side by side"
	@echo "make build-dev   rebuild the extension into .venv"
	@echo "make lint        ruff, cargo fmt --check, clippy -D warnings"

demo:
	scripts/demo.sh

install build-dev:
	scripts/bootstrap.sh

wheel:
	BOOTSTRAP_BUILD=0 scripts/bootstrap.sh
	scripts/wheel.sh

check-wheel:
	scripts/check_wheel.sh

test:
	scripts/test.sh

test-rust:
	cargo test --locked

test-python: build-dev
	.venv/bin/python -m pytest -q

bench:
	PROFILE=release scripts/bootstrap.sh
	cargo bench --bench core
	.venv/bin/python benches/bench_guard.py
	.venv/bin/python benches/bench_audit_http.py
	.venv/bin/python benches/bench_cli.py
	.venv/bin/python benches/bench_redis.py
	.venv/bin/python benches/bench_fleet_keys.py

lint:
	.venv/bin/python -m ruff check python tests benches
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
