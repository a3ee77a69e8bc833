"""Fixtures shared by the test files: a tiny checkpoint, and a server on one."""

import os
import subprocess
import sys

import pytest

from personaplex_fast.tiny import make_tiny


class Served(str):
    """A server's base url; `.log`: the path of its log (stderr), `.model`: its model."""

    log: str
    model: object


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny official-format checkpoint (make_tiny), made once per test module."""
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """`personaplex-fast serve` on a tiny checkpoint, a free port and three slots; yields
    its base url (a Served) and checks it shuts down cleanly (its log is printed at the end)."""
    tiny = make_tiny(tmp_path_factory.mktemp("tiny"))
    log = open(tmp_path_factory.mktemp("log") / "serve.err", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(tiny), "--port", "0",
         "--max-sessions", "3", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://"), (line, open(log.name).read())
        served = Served(line.split()[1].rstrip("/"))
        served.log, served.model = log.name, tiny
        yield served
    finally:
        proc.terminate()
        rc = proc.wait(10)
        log.seek(0)
        print(log.read())
        assert rc == 0
