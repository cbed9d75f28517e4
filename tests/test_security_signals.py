"""Signals end long-running commands cleanly (issue 12): SIGTERM during profiling leaves no pool
worker behind and a work directory a rerun resumes from; one line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def default_sigint() -> None:
    # A suite started in the background (`make test &`) ignores SIGINT, and so would the command
    # it starts, as the shell intends: give the command the Ctrl-C a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout_s: float, what: str) -> None:
    give_up_at = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up_at:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from datasets.synthetic import write_synthetic_scene

    path = tmp_path_factory.mktemp("scene") / "scene.tfrecord"
    return write_synthetic_scene(path, frames=40, cameras=["FRONT"], progress=False, workers=1)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_profiling_leaves_no_worker_and_a_resumable_cache(tmp_path, scene, sig):
    # Issue 12: SIGTERM left two ~300 MB pool workers running forever, blocked on a pipe.
    out = tmp_path / "profile" / "profile.parquet"
    work_dir = out.parent / ".profile-work"
    process = subprocess.Popen(
        [sys.executable, "-m", "avcloud", "profile", "--scene", str(scene), "--models", "avd-onboard", "avd-cloud-l",
         "--codecs", "inpcomp75", "imgcomp75", "--workers", "2", "--out", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, preexec_fn=default_sigint)
    try:
        # Mid-profiling: the workers run and the first frames are on disk.
        wait_for(lambda: process.poll() is not None or any(work_dir.glob("frame-*.parquet")), 120, "a profiled frame")
        assert process.poll() is None, "profiling finished before the signal: make the scene longer"
        children = children_of(process.pid)
        assert len(children) >= 2
        process.send_signal(sig)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == (143 if sig == signal.SIGTERM else 130)
    assert stderr.strip().splitlines() == [f"avcloud profile: {'terminated' if sig == signal.SIGTERM else 'interrupted'}"]
    wait_for(lambda: not any(alive(child) for child in children), 10, "the pool's processes to end")
    # What was profiled stays: every chunk on disk is complete, the manifest intact.
    assert json.loads((work_dir / "manifest.json").read_text())["configurations"]
    chunks = sorted(work_dir.glob("frame-*.parquet"))
    assert chunks and all(pq.read_table(chunk).num_rows > 0 for chunk in chunks)
    assert not out.exists()


POOL_SCRIPT = """
import multiprocessing, sys, time
from concurrent.futures import ProcessPoolExecutor
from avcloud.pools import serve_the_parent_only
if __name__ == "__main__":
    executor = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=serve_the_parent_only)
    futures = [executor.submit(time.sleep, 600) for _ in range(2)]
    while len(executor._processes) < 2:
        time.sleep(0.05)
    print(" ".join(str(pid) for pid in executor._processes), flush=True)
    time.sleep(600)
"""


def test_pool_workers_end_themselves_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        process.kill()  # SIGKILL: no cleanup at all in the parent
        process.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in workers), 15, "orphaned workers to end")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()


def test_a_stopped_pool_leaves_no_manager_thread_for_the_exit_hook_to_race():
    # At exit CPython 3.11 wakes every pool's manager thread through a pipe that thread closes as
    # it ends; one still ending then made a Ctrl-C'd `profile` print a traceback after its line.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from avcloud.pools import stop_pool

    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = executor.submit(time.sleep, 60)
    wait_for(future.running, 60, "the task to start")
    manager = executor._executor_manager_thread  # noqa: SLF001
    stop_pool(executor)
    assert not manager.is_alive()


def descendants_of(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        children = set().union(*(children_of(parent) for parent in frontier)) - found
        found |= children
        frontier = children
    return found


def command_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_sigterm_during_a_ray_fleet_sweep_ends_it_cleanly(tmp_path):
    # Ray's core worker took SIGTERM over: a native stack trace on stderr, the process killed by
    # the signal and the command's own cleanup skipped.
    pytest.importorskip("ray", reason="the Ray executor needs the optional extra: pip install -e '.[ray]'")
    process = subprocess.Popen(
        [sys.executable, "-m", "avcloud", "fleet", "--no-progress", "--executor", "ray", "--vehicles", "1", "2", "4",
         "8", "16", "32", "64", "128", "--policy", "turbo", "turbo-q", "--out", str(tmp_path / "report")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: process.poll() is not None
                 or any(command_name(child) == "raylet" for child in descendants_of(process.pid)), 120, "Ray to start")
        assert process.poll() is None, "the sweep ended before the signal"
        time.sleep(3.0)  # the tasks are running
        ray_processes = descendants_of(process.pid)
        process.send_signal(signal.SIGTERM)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "avcloud fleet: terminated", stderr
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr
    wait_for(lambda: not any(alive(pid) for pid in ray_processes), 30, "Ray's processes to end")
