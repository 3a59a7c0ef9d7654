"""Process-wide malloc tuning happens once, at program start-up, never in library constructors."""

import sys

import pytest

from hat import cli, runtime


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))


@pytest.fixture()
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(runtime, "_freed_memory_kept", False)
    return fake


def test_keep_freed_memory_sets_malloc_once(libc):
    assert runtime.keep_freed_memory() and runtime.keep_freed_memory()
    assert libc.calls == [(runtime.M_TRIM_THRESHOLD, 1 << 30), (runtime.M_MMAP_THRESHOLD, 1 << 25)]


def test_keep_freed_memory_without_glibc(monkeypatch):
    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(runtime.ctypes, "CDLL", missing)
    monkeypatch.setattr(runtime, "_freed_memory_kept", False)
    assert not runtime.keep_freed_memory()


def main(argv):
    """A stand-in subcommand for the dispatcher test."""


def test_the_hat_command_keeps_freed_memory(libc, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "stand-in", (__name__, ""))
    assert cli.main(["stand-in"]) == 0 and len(libc.calls) == 2


def test_hat_starts_without_torch():
    import subprocess

    code = "import sys, hat.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
