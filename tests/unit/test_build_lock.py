"""A C++ build killed half-way must not stall the next process (the CI run that hung 90 min
on the baton a killed `p3 serve` had left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from p3.kernels import build

# A real extension, but one that compiles in a second: the Python C API only.
TINY_SOURCE = r"""
#include <Python.h>
#define P3_CAT(a, b) a##b
#define P3_INIT(name) P3_CAT(PyInit_, name)
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "tiny", NULL, -1, NULL};
PyMODINIT_FUNC P3_INIT(TORCH_EXTENSION_NAME)(void) {
    PyObject *module = PyModule_Create(&tiny);
    PyModule_AddIntConstant(module, "answer", 42);
    return module;
}
"""


@pytest.fixture
def tiny_build(tmp_path, monkeypatch):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    monkeypatch.setenv("P3_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(build, "SOURCES", (source,))
    monkeypatch.setattr(build, "HEADERS", ())
    build.extension_name.cache_clear()
    yield
    build.extension_name.cache_clear()


def _holder(lock) -> subprocess.Popen:
    """A process that takes the build lock and keeps it until killed."""
    code = (
        "import sys, time; from pathlib import Path; from p3.kernels import build\n"
        f"with build._exclusive(Path({str(lock)!r})):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(120)
def test_a_killed_builder_leaves_nothing_that_blocks(tiny_build):
    directory = build.build_dir()
    directory.mkdir(parents=True)
    holder = _holder(directory / "build.flock")
    # What a killed cpp_extension build leaves: its baton and a half-written directory.
    (directory / "lock").touch()
    os.utime(directory / "lock", (time.time() + 3600,) * 2)  # a clock that disagrees
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    module = build._import_or_build()
    assert module.answer == 42
    assert (directory / "built.ok").exists()
    assert time.monotonic() - started < 60
    # A second process imports the finished library without building.
    assert build._import_or_build().answer == 42


@pytest.mark.timeout(60)
def test_a_live_builder_is_waited_for_then_given_up_on(tiny_build, monkeypatch):
    directory = build.build_dir()
    directory.mkdir(parents=True)
    holder = _holder(directory / "build.flock")
    try:
        monkeypatch.setattr(build, "BUILD_WAIT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="held"):
            build._import_or_build()
        assert 1.0 <= time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert build._import_or_build().answer == 42
