"""fastmcp-guard built from another commit, for benchmarks that compare builds.

``baseline_package(ref)`` builds commit ``ref`` in release mode (``maturin build
--release``) and installs the wheel with ``pip install --target`` into a directory that
goes first on a worker's ``PYTHONPATH`` (or ``sys.path``): its ``fastmcp_guard``
package and ``_core`` extension then shadow the ones in ``.venv``. It builds once: a
directory that already holds the build is returned as it is. ``describe(path)`` says
which commit a directory holds (the ``COMMIT`` file written beside the package).

Cargo's own dependencies are the same in every commit of this tree, so the first build
seeds its target directory (``target/bench-baseline``) with a copy of this checkout's
release dependencies, when there are some: the baseline then compiles little more than
the crate itself. The crate's own outputs are never shared: a ``cdylib`` has no hash in
its file name, and two builds of it in one target directory would overwrite each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Cargo's target directory for baseline builds (kept between runs: incremental).
TARGET = ROOT / "target" / "bench-baseline"


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                          check=True).stdout  # fmt: skip


def commit_of(ref: str) -> str:
    """The full hash of ``ref`` (raises ``CalledProcessError`` for an unknown ref)."""
    return git("rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()


def describe(path: Path) -> str:
    """The short commit a baseline directory was built from, or its path if it does not say."""
    marker = path / "COMMIT"
    return marker.read_text().strip()[:7] if marker.is_file() else str(path)


def baseline_package(ref: str, dest: Path | None = None) -> Path:
    """fastmcp-guard built (release) from commit ``ref`` and installed into ``dest``
    (default ``.cache/bench-baseline/<commit>``), once; the directory goes first on
    ``sys.path``. A ``dest`` that holds a build of another commit is refused."""
    sha = commit_of(ref)
    dest = dest or ROOT / ".cache" / "bench-baseline" / sha
    if (dest / "fastmcp_guard").is_dir():
        marker = dest / "COMMIT"
        if marker.is_file() and marker.read_text().strip() != sha:
            raise SystemExit(f"{dest} holds a build of {marker.read_text().strip()[:10]}, "
                             f"not of {ref} ({sha[:10]}): give another directory")  # fmt: skip
        return dest
    print(f"  building the baseline, commit {sha[:10]} (release; once) into {dest} ...", flush=True)
    seed_target()
    with tempfile.TemporaryDirectory(prefix="fmg-baseline-") as tmp:
        src, dist = Path(tmp) / "src", Path(tmp) / "dist"
        src.mkdir()
        subprocess.run(["tar", "-x", "-C", str(src)], input=git("archive", sha), check=True)
        env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
        maturin = Path(sys.executable).parent / "maturin"
        subprocess.run([str(maturin), "build", "--release", "-q", "-o", str(dist), "-m",
                        str(src / "Cargo.toml")], env=env, check=True)  # fmt: skip
        wheel = next(dist.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--disable-pip-version-check", "--target", str(dest), str(wheel)],
                       check=True)  # fmt: skip
    (dest / "COMMIT").write_text(sha + "\n")
    return dest


def seed_target() -> None:
    """Copy this checkout's compiled release dependencies into the baseline's target
    directory, the first time (the crate's own ``lib_core`` outputs stay behind)."""
    own, seeded = ROOT / "target" / "release", TARGET / "release"
    if seeded.exists() or not (own / "deps").is_dir():
        return
    for part in ("deps", "build", ".fingerprint"):
        if (own / part).is_dir():
            shutil.copytree(own / part, seeded / part, symlinks=True,
                            ignore=shutil.ignore_patterns("lib_core.*", "_core.*", "_core-*", "fastmcp-guard-*",
                                                          "fastmcp_guard-*"))  # fmt: skip
