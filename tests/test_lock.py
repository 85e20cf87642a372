"""DirLock: one writer at a time, re-entrant within a process, recovered when the holder dies."""
import os
import signal
import subprocess
import sys
import time

import pytest

from mtpeft.errors import MtpeftError
from mtpeft.lock import DirLock, holder, is_locked_here

HOLD = ("import sys, time\n"
        "from mtpeft.lock import DirLock\n"
        "with DirLock(sys.argv[1], what='bank'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")


def _holding_process(path):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                         cwd=os.getcwd())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    p = _holding_process(tmp_path)
    try:
        with pytest.raises(MtpeftError, match=rf"bank {tmp_path} is in use by process {p.pid}"):
            DirLock(tmp_path, what="bank").acquire()
        assert holder(tmp_path)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_holder_is_recovered(tmp_path):
    p = _holding_process(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with DirLock(tmp_path) as lock:  # the kernel dropped the dead process's lock
        assert is_locked_here(tmp_path) and lock is not None
        assert holder(tmp_path)["pid"] == os.getpid()
    assert not is_locked_here(tmp_path)


def test_reentrant_within_a_process(tmp_path):
    with DirLock(tmp_path):
        with DirLock(tmp_path):
            assert is_locked_here(tmp_path)
        assert is_locked_here(tmp_path)  # the outer hold is still there
    assert not is_locked_here(tmp_path)
    t0 = time.time()
    with DirLock(tmp_path):  # free again
        assert time.time() - t0 < 60


def test_symlinked_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(MtpeftError, match="symbolic link"):
        DirLock(tmp_path / "link").acquire()
