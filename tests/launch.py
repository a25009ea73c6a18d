"""Launching subprocesses (torchrun and friends) from tests."""
import contextlib
import os
import signal
import socket
import subprocess
import tempfile

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ok(cmd: list[str]) -> str:
    """Run cmd with one OpenMP thread per process; assert it succeeded; return its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_within(cmd: list[str], seconds: float) -> subprocess.CompletedProcess:
    """Run cmd as run_ok does, whatever its exit status; fail the test if it is still running after `seconds`,
    stopping it: SIGTERM (torchrun passes it on to its workers, which have sessions of their own), then SIGKILL
    to what is left of its process group. Output goes to files: a worker left alive would hold a pipe open."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        try:
            proc.wait(timeout=seconds)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()
            try:
                proc.wait(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if hung:
        pytest.fail(f"still running after {seconds} s (hung?): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result
