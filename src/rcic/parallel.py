"""Worker processes that die with rcic: a killed or interrupted command leaves none running.

``imap_processes`` runs ``fn`` over ``jobs`` in a process pool (in order, results as they come).
Each worker asks the kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
``kill -9`` of rcic takes its workers along; on Ctrl-C or an error, pending jobs are cancelled and
the workers terminated at once instead of finishing the queue.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still applies
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def imap_processes(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(job)
        return
    pool = ProcessPoolExecutor(min(workers, len(jobs)), initializer=_die_with_parent)
    try:
        yield from pool.map(fn, jobs)
    except BaseException:
        for process in list((pool._processes or {}).values()):  # the pool has no public terminate
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
