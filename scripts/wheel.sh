#!/usr/bin/env bash
# Build the release wheel into dist/: one abi3 wheel (CPython 3.10 and later, see
# pyo3's abi3-py310 in Cargo.toml) with a manylinux tag that maturin's own audit
# checked (the lowest one the extension's glibc symbols allow; `--compatibility pypi`
# fails rather than fall back to a plain `linux` tag PyPI would refuse).
# Prints the wheel's path last. Needs .venv (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
rm -rf dist
maturin build --release --locked -q --out dist --compatibility pypi --auditwheel check >&2
ls dist/fastmcp_guard-*-abi3-*manylinux*.whl
