"""The repository names no absolute path of the machine it was written on."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache"}
# Written in pieces so that this file does not match itself.
MACHINE_PATH = re.compile("(?<![\\w.])/" + "(work|root|home)/")


def _text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in (f for f in files if f != ".git"):  # a worktree's pointer to its repository
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                data = f.read()
            if b"\0" not in data:
                yield os.path.relpath(path, ROOT), data.decode("utf-8", "replace")


def test_no_absolute_machine_paths():
    found = [
        f"{path}:{number}: {line.strip()}"
        for path, text in _text_files()
        for number, line in enumerate(text.splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert not found, "Absolute machine paths (use paths relative to the repo):\n" + "\n".join(found)


def test_bench_cpu_records_its_output_dir_relative_to_the_repo():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu
    finally:
        sys.path.pop(0)
    inside = os.path.join(ROOT, "benchmarks", "results")
    assert bench_cpu._within_repo(inside) == os.path.join("benchmarks", "results")
    outside = os.path.join(os.path.dirname(ROOT), "elsewhere")
    assert bench_cpu._within_repo(outside) == outside
