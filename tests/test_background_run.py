"""How the suite's background run-all is started (tests/run_all_shop.py): at the lowest priority, in a
process group of its own, and in the test run's session, so that nice 19 counts where the kernel's
scheduler autogroups give each session an equal share of the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from run_all_shop import BACKGROUND


def test_the_background_child_keeps_the_session_and_gets_its_own_group_at_nice_19():
    child = subprocess.Popen(["sleep", "30"], **BACKGROUND)
    try:
        # A child in a new session (setsid) would land in an autogroup of its own at nice 0.
        assert os.getsid(child.pid) == os.getsid(0)
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
        # /proc/PID/stat: the command is in parentheses; "nice" is the 19th field, the 17th after them.
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[16]) == 19
        # /proc/PID/autogroup names the task's autogroup, and is empty where the task is not in one
        # (autogroups off, or the task in a cpu cgroup of its own, as in CI's containers): then the
        # child must not be in one either.
        autogroup = Path(f"/proc/{child.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text() == Path("/proc/self/autogroup").read_text()
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
