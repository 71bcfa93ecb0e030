"""Worker processes that die with rcic: a killed or interrupted command leaves none running.

``imap_processes`` runs ``fn`` over ``jobs`` in a process pool (in order, results as they come);
``worker_pool`` is the pool itself, for callers that submit their own jobs. Each worker asks the
kernel to kill it when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
``kill -9`` of rcic takes its workers along; on Ctrl-C or an error, pending jobs are cancelled and
the workers terminated at once instead of finishing the queue.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


def die_with_parent() -> None:
    """In a worker process: be killed when the parent dies, and leave Ctrl-C to the parent."""
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
    with worker_pool(min(workers, len(jobs)), initializer=die_with_parent) as pool:
        yield from pool.map(fn, jobs)


@contextmanager
def worker_pool(workers: int, **pool_args) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor(workers, **pool_args)`` whose workers are terminated at once, pending jobs
    cancelled, when the block raises (Ctrl-C included); shut down normally otherwise. The initializer
    should call ``die_with_parent``."""
    pool = ProcessPoolExecutor(workers, **pool_args)
    try:
        yield pool
    except BaseException:
        for process in list((pool._processes or {}).values()):  # the pool has no public terminate
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
