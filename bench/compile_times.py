"""Where a cold start's compile time goes: runs `numba-attn generate` (the arguments given, else
the demo's "The old sea" for 32 tokens) with Numba's cache in a fresh temporary folder unless
NUMBA_CACHE_DIR is set, and lists each top-level function compiled (nested compiles counted in
their caller), in order, with its seconds.

    python bench/compile_times.py [generate ARGS...]"""
import os
import sys
import tempfile
import time

os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp())

from numba.core import event  # noqa: E402


class Log(event.Listener):
    def __init__(self):
        self.depth, self.done = 0, []

    def on_start(self, ev):
        self.depth += 1
        if self.depth == 1:
            self.t0 = time.perf_counter()

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            f = ev.data["dispatcher"].py_func
            self.done.append((time.perf_counter() - self.t0, f"{f.__module__}.{f.__qualname__}"))


def main():
    from numba_attn.cli import main as cli
    log = Log()
    t = time.perf_counter()
    with event.install_listener("numba:compile", log):
        cli(sys.argv[1:] or ["generate", "The old sea", "--max-tokens", "32", "--seed", "1"],
            standalone_mode=False)
    total = time.perf_counter() - t
    print(f"\n{total:.1f} s in all, {sum(s for s, _ in log.done):.1f} s compiling:",
          file=sys.stderr)
    for s, name in log.done:
        print(f"  {s:6.2f} s  {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
