"""The CPU thread pool, for the host wrappers of the parallel kernels: work too small to pay for
waking the pool's threads (a tiny model's decode step) runs on the calling thread alone. On a
busy machine a parallel region waits for its slowest thread's next time slice, milliseconds."""
from numba import get_num_threads, set_num_threads

PARALLEL_MIN_WORK = 1 << 18  # multiply-adds below which a kernel runs on one thread


def run(kernel, work, *args):
    """kernel(*args), on one thread when work (multiply-adds or elements) is small."""
    if work >= PARALLEL_MIN_WORK:
        return kernel(*args)
    n = get_num_threads()
    set_num_threads(1)              # thread-local: other Python threads keep their pools
    try:
        return kernel(*args)
    finally:
        set_num_threads(n)


def bind(kernel, work, *tail):
    """f(*head) = run(kernel, work, *head, *tail), the choice of threads made once."""
    if work >= PARALLEL_MIN_WORK:
        return lambda *head: kernel(*head, *tail)
    return lambda *head: run(kernel, work, *head, *tail)
