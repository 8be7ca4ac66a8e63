"""A faster barrier and kept threads for numba's CUDA simulator (every CUDA test module under it).

The simulator (numba-cuda 0.30.4) runs each block's threads as Python threads, released from
syncthreads() by a manager thread that polls every thread in a busy loop: with 256 threads the
manager and the workers fight for the GIL, and a 256-thread GEMV block takes about 0.5 s; and
it starts an OS thread for every simulated thread of every block. Here syncthreads() is a
lock-based barrier over the block's live threads (a thread that has returned no longer counts,
as on the GPU), and a block runs on threads kept from the blocks before (_Worker; a model test
on a 2-core VM, 124 s with new threads, 45 s with kept ones). Semantics
are the simulator's: every live thread of the block waits until all have arrived; an exception
in one thread aborts the others and is re-raised with its traceback.

    with fast_barrier():
        ... launches ...
"""
import contextlib
import sys
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


class _Worker(_kernel.BlockThread):
    """A simulated CUDA thread kept for the next block: starting an OS thread costs 0.2-0.7 ms
    on some virtual machines, and a block of 256 threads starts 256. Each job gives it a
    block's BlockThread attributes (the simulator reads them from current_thread())."""

    def __init__(self):
        threading.Thread.__init__(self, daemon=True)
        self.go = threading.Lock()
        self.go.acquire()
        self.job = None
        self.start()

    def assign(self, manager, block_idx, thread_idx, job):
        self.syncthreads_event = threading.Event()
        self.syncthreads_blocked = False
        self._manager, self.debug = manager, manager._debug
        self.blockIdx, self.threadIdx = _kernel.Dim3(*block_idx), _kernel.Dim3(*thread_idx)
        bd = _kernel.Dim3(*manager._block_dim)
        self.thread_id = self.threadIdx.x + bd.x * (self.threadIdx.y + bd.y * self.threadIdx.z)
        self.exception, self.abort, self.job = None, False, job
        self.__dict__.pop("_shfl_parity", None)   # util_cuda's shfl_xor: as a new thread's
        self.go.release()

    def run(self):
        while True:
            self.go.acquire()
            target, done = self.job
            try:
                target()
            except Exception as e:      # as BlockThread.run reports it
                where = f"tid={list(self.threadIdx)} ctaid={list(self.blockIdx)}"
                self.exception = (type(e)(f"{where}: {e}" if str(e) else where),
                                  sys.exc_info()[2])
            done()


_workers = []


def _run(self, grid_point, *args):
    import numpy as np
    n = int(np.prod(self._block_dim))
    blk = self._block = _Block(n)
    finished = threading.Lock()
    finished.acquire()
    left = [n]

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

    def done():
        with blk.mutex:
            left[0] -= 1
            if left[0] == 0:
                finished.release()

    while len(_workers) < n:
        _workers.append(_Worker())
    threads = _workers[:n]
    for t, block_point in zip(threads, np.ndindex(*self._block_dim)):
        t.assign(self, grid_point, block_point, (target, done))
    finished.acquire()            # every thread of the block has returned
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
