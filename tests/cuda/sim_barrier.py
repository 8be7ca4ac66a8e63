"""A faster barrier for numba's CUDA simulator, for the tests that run many launches (the model).

The simulator (numba-cuda 0.30.4) runs each block's threads as Python threads, released from
syncthreads() by a manager thread that polls every thread in a busy loop: with 256 threads the
manager and the workers fight for the GIL, and a 256-thread GEMV block takes about 0.5 s. Here
syncthreads() is a condition-variable barrier over the block's live threads (a thread that has
returned no longer counts, as on the GPU), and the manager just joins the threads. Semantics
are the simulator's: every live thread of the block waits until all have arrived; an exception
in one thread aborts the others and is re-raised with its traceback.

    with fast_barrier():
        ... launches ...
"""
import contextlib
import threading

from numba.cuda.simulator import kernel as _kernel


class _Block:
    def __init__(self, live):
        self.mutex = threading.Lock()
        self.live = live          # threads that have not returned
        self.waiting = []         # the locks of the threads waiting at the barrier
        self.abort = False

    def release_if_all(self):
        # with mutex held: everyone alive is waiting -> open the barrier
        if self.waiting and len(self.waiting) == self.live:
            for lock in self.waiting:
                lock.release()
            self.waiting = []

    def abort_all(self):
        with self.mutex:
            self.abort = True
            for lock in self.waiting:
                lock.release()
            self.waiting = []


def _syncthreads(self):
    # each thread waits on its own lock (taken here, released by the last to arrive), so the
    # woken threads do not queue for a shared lock
    blk = self._manager._block
    lock = self.__dict__.get("_barrier_lock")
    if lock is None:
        lock = self._barrier_lock = threading.Lock()
    lock.acquire()
    with blk.mutex:
        if blk.abort:
            lock.release()
            raise RuntimeError("abort flag set on syncthreads call")
        blk.waiting.append(lock)
        blk.release_if_all()
    lock.acquire()            # until the barrier opens
    lock.release()
    if blk.abort:
        raise RuntimeError("abort flag set on syncthreads clear")


def _run(self, grid_point, *args):
    import numpy as np
    blk = self._block = _Block(int(np.prod(self._block_dim)))

    def target():
        try:
            self._f(*args)
        except BaseException:
            blk.abort_all()
            raise
        finally:
            with blk.mutex:
                blk.live -= 1
                blk.release_if_all()

    threads = [_kernel.BlockThread(target, self, grid_point, block_point, self._debug)
               for block_point in np.ndindex(*self._block_dim)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the first exception raised (not an abort that followed it)
    errors = [t.exception for t in threads if t.exception]
    first = [e for e in errors if "abort flag" not in str(e[0])] or errors
    if first:
        raise first[0][0].with_traceback(first[0][1])


@contextlib.contextmanager
def fast_barrier():
    """Swap in the faster barrier for the duration of the block (simulator only)."""
    saved = _kernel.BlockManager.run, _kernel.BlockThread.syncthreads
    _kernel.BlockManager.run, _kernel.BlockThread.syncthreads = _run, _syncthreads
    try:
        yield
    finally:
        _kernel.BlockManager.run, _kernel.BlockThread.syncthreads = saved
