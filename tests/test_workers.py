"""Worker processes: the fork server's workers take the caller's working folder and environment of the moment,
and `process_alive` tells a running process from a finished or zombie one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dualsynth.config import process_alive, wait_for_worker_server, worker_context, worker_initializer


def _where_and_env(_: int) -> tuple[str, str | None, int]:
    return os.getcwd(), os.environ.get("DUALSYNTH_TEST_MARK"), os.getpid()


def test_workers_see_the_callers_folder_and_environment_of_now(tmp_path, monkeypatch):
    ctx = worker_context()  # a fork server, started (if not already) before the changes below
    wait_for_worker_server(ctx)  # its imports done
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DUALSYNTH_TEST_MARK", "after-the-server-started")
    initializer, initargs = worker_initializer()
    with ctx.Pool(2, initializer=initializer, initargs=initargs) as pool:
        results = pool.map(_where_and_env, range(4))
    assert {(cwd, mark) for cwd, mark, _ in results} == {(str(tmp_path), "after-the-server-started")}
    assert all(pid != os.getpid() for _, _, pid in results)
    if "forkserver" in __import__("multiprocessing").get_all_start_methods():
        assert ctx.get_start_method() == "forkserver"


def test_process_alive_tells_running_from_finished_and_zombie():
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    if os.path.exists("/proc/self/stat"):  # the exited child stays a zombie until it is reaped
        while process_alive(child.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_a_worker_ends_when_the_process_it_serves_is_gone(tmp_path):
    """A fork server's worker is not the child of the process that asked for it: it watches that pid."""
    pid_file = tmp_path / "worker.pid"
    code = (
        "import time\n"
        "from dualsynth.config import worker_context, worker_initializer\n"
        "from tests.test_workers import _write_pid_and_sleep\n"
        "init, args = worker_initializer()\n"
        "pool = worker_context().Pool(1, initializer=init, initargs=args)\n"
        f"pool.apply_async(_write_pid_and_sleep, ({str(pid_file)!r},))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert process_alive(worker)
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while process_alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker)


def _write_pid_and_sleep(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(60)
