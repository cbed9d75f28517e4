"""Process pools that end with their command: on SIGINT, SIGTERM (avcloud.errors.Terminated) or
an error, no worker outlives the process that started it.

    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=my_initializer)
    try:
        ...submit and wait...
    except BaseException:
        stop_pool(executor)  # cancel, terminate, reap
        raise
    executor.shutdown(wait=True)

and in the worker initializer, `serve_the_parent_only()`: Ctrl-C is left to the parent (which
stops the pool; no traceback per worker), and a worker whose parent is gone, even killed with
SIGKILL, ends itself instead of waiting forever on its task pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PARENT_CHECK_PERIOD_S = 1.0


def stop_pool(executor: ProcessPoolExecutor, grace_s: float = 10.0) -> None:
    """Cancel the tasks not started, terminate the workers (SIGTERM, then SIGKILL after grace_s)
    and reap them."""
    # The executor keeps its processes and its manager thread in private attributes (CPython
    # 3.8-3.13); shutdown() drops them.
    processes = list((getattr(executor, "_processes", None) or {}).values())
    manager = getattr(executor, "_executor_manager_thread", None)
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=grace_s)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    # The manager thread closes its wake-up pipe as it ends. Still running at interpreter exit,
    # it races the exit hook that writes to that pipe (CPython 3.11 checks, then writes), and a
    # Ctrl-C'd command printed a traceback after its one line; ended here, the hook skips it.
    if manager is not None and manager.is_alive():
        manager.join(timeout=grace_s)


def serve_the_parent_only() -> None:
    """Call in a pool worker's initializer (not in the main process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the CLI's SIGTERM handler, which would raise in it: `stop_pool`
    # ends workers with SIGTERM, which should simply end them.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The pid the parent had when it started this worker (it may be gone before this line runs).
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_PERIOD_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
