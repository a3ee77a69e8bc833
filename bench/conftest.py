"""Collect bench_*.py here: `pytest bench/` runs the micro-benchmarks, plain `pytest`
(testpaths = tests) never does."""

import pytest


def pytest_collect_file(parent, file_path):
    # A file named on the command line is collected by pytest itself.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
