"""A JIT build killed half-way must not hang later builds (dsincubate/ops/builder.py `build_lock`).

torch versions whose extension build lock is `torch.utils.file_baton.FileBaton` (the `lock` file's existence is the
lock) wait forever for the file a killed build leaves. Each scenario runs in subprocesses with a timeout, so a
regression fails instead of hanging:

* a build after a killed one proceeds (the real `OpBuilder.load` of a tiny CPU extension, compiled with ninja);
* torch's FileBaton protocol, run inside `build_lock` after a killed FileBaton holder, returns (without it: waits);
* a lock held by a live builder is respected (waited for, then an error naming it; its files are left alone).

    python -m pytest tests/ops/test_builder_lock.py
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsincubate.ops import builder

ROOT = Path(__file__).resolve().parents[2]

# A C++ Python module named by torch's -DTORCH_EXTENSION_NAME (no torch headers: compiles in seconds).
TINY_SOURCE = r"""
#include <Python.h>
#define DSI_STR2(x) #x
#define DSI_STR(x) DSI_STR2(x)
#define DSI_CAT2(a, b) a##b
#define DSI_CAT(a, b) DSI_CAT2(a, b)
static struct PyModuleDef dsi_module = {PyModuleDef_HEAD_INIT, DSI_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC DSI_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&dsi_module); }
"""

TINY_BUILDER = """
import sys
from pathlib import Path
from dsincubate.ops import builder

class Tiny(builder.OpBuilder):
    NAME = "tinylock"
    def sources(self):
        return [sys.argv[1]]
    def build_tag(self):
        return "test"
    def nvcc_flags(self):
        return []
    def is_compatible(self):
        return True, "CPU-only test extension"
"""


def _python(code: str, *args, timeout: float, env=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _killed_filebaton_build(lock: Path) -> None:
    """A process that takes torch's FileBaton lock as an older torch's JIT build does, then is SIGKILLed."""
    p = _python("""
        import os, signal, sys
        from torch.utils.file_baton import FileBaton
        assert FileBaton(sys.argv[1]).try_acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        """, lock, timeout=120)
    assert p.returncode == -signal.SIGKILL and lock.exists()


def test_a_build_after_a_killed_build_proceeds_and_loads(tmp_path):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed (torch's JIT build needs it)")
    src = tmp_path / "tiny.cpp"
    src.write_text(TINY_SOURCE)
    cache = tmp_path / "cache"
    build_dir = cache / "dsi_tinylock_test"
    build_dir.mkdir(parents=True)
    _killed_filebaton_build(build_dir / "lock")
    try:
        p = _python(TINY_BUILDER + "print('loaded', Tiny().load().__name__)\n", src, timeout=300,
                    env={"DSI_OPS_CACHE": str(cache)})
    except subprocess.TimeoutExpired:
        pytest.fail("the build waited for the lock a killed build left")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loaded dsi_tinylock_test" in p.stdout


def test_filebaton_protocol_inside_build_lock_returns_after_a_killed_holder(tmp_path):
    lock = tmp_path / "lock"
    _killed_filebaton_build(lock)
    # What an older torch's cpp_extension does: build if it can take the baton, else wait for the holder.
    baton = textwrap.dedent("""
        import sys
        from torch.utils.file_baton import FileBaton
        def old_torch_jit_lock(path):
            b = FileBaton(path, wait_seconds=0.05)
            if b.try_acquire():
                b.release()
                return "built"
            b.wait()
            return "waited"
        """)
    # The scenario is real: without build_lock the wait does not return.
    with pytest.raises(subprocess.TimeoutExpired):
        _python(baton + "old_torch_jit_lock(sys.argv[1])\n", lock, timeout=8)
    try:
        p = _python(baton + textwrap.dedent("""
            from pathlib import Path
            from dsincubate.ops.builder import build_lock
            with build_lock(Path(sys.argv[1]).parent):
                print(old_torch_jit_lock(sys.argv[1]))
            """), lock, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a FileBaton build waited forever for the lock of a killed build")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["built"]
    if builder.torch_lock_is_a_file():
        assert "stale build lock" in p.stderr


def test_a_lock_held_by_a_live_builder_is_respected(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from dsincubate.ops.builder import build_lock
        d = Path(sys.argv[1])
        with build_lock(d):
            (d / "lock").write_text("")  # torch's lock of the build in progress
            print("held", flush=True)
            time.sleep(120)
        """), str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid}"):
            with builder.build_lock(tmp_path, wait_s=1.0, poll_s=0.05):
                pass
        assert (tmp_path / "lock").exists()  # the live build's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    with builder.build_lock(tmp_path, wait_s=10):  # its owner gone, the lock is ours
        assert not (tmp_path / "lock").exists()
