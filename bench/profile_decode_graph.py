"""Where a captured decode step's GPU time goes: the step's launches grouped by step kind
(rmsnorm, linear, rope, ...), each group captured as a graph of its own and replayed, timed
with events. The groups' sum against the whole step's graph says what the launches cost
beyond their work.

    python bench/profile_decode_graph.py [--path /tmp/tinyllama] [--weight-dtype float16]
"""
import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def graph_time(decoder, calls, reps=50):
    """Median replay time in us of a graph holding `calls` (each call(stream))."""
    from numba import cuda
    builder = decoder._core_stream.create_graph_builder()
    builder.begin_building()
    for call in calls:
        call(builder)
    builder.end_building()
    graph = builder.complete()
    times = []
    for _ in range(reps):
        e0, e1 = cuda.event(), cuda.event()
        e0.record(decoder.stream)
        graph.launch(decoder._core_stream)
        e1.record(decoder.stream)
        e1.synchronize()
        times.append(cuda.event_elapsed_time(e0, e1) * 1e3)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default="/tmp/tinyllama")
    ap.add_argument("--weight-dtype", default="float32")
    ap.add_argument("--pos", type=int, default=100)
    args = ap.parse_args()
    from numba_attn.model import Model
    model = Model.from_pretrained(args.path, device="cuda", weight_dtype=args.weight_dtype,
                                  max_seq=1024)
    model.warmup()
    model.forward(np.arange(args.pos) % 1000, 0)
    model.forward([5], args.pos)                       # captures the plan
    decoder, steps = model.decoder, model.decoder.steps
    steps.splits = steps.plan(args.pos + 1)
    calls = collections.defaultdict(list)              # kind -> [call(stream)]

    class Recorder:
        def __getattr__(self, name):
            method = getattr(steps, name)
            if name == "split_qkv":                     # views, no launch
                return method

            def record(*a, **kw):
                def call(stream, method=method, a=a, kw=kw):
                    steps.stream = stream
                    try:
                        method(*a, **kw)
                    finally:
                        steps.stream = decoder.stream
                kind = name
                if name == "linear":
                    kind = f"linear {tuple(a[1].shape)}"
                calls[kind].append(call)
                if name == "append_kv":                 # the cache views attention reads
                    return method(*a, **kw)
                return kw.get("out")
            return record

    model.run_layers(Recorder(), decoder.buffers, decoder.ids, 1, 0)
    everything = [c for kind in calls for c in calls[kind]]
    total = graph_time(decoder, [c for c in everything])
    print(f"{args.weight_dtype}, position {args.pos}: the whole step's launches "
          f"({len(everything)}) in one graph: {total:.1f} us")
    rows, s = [], 0.0
    for kind, cs in calls.items():
        t = graph_time(decoder, cs)
        s += t
        rows.append((t, kind, len(cs)))
    for t, kind, n in sorted(rows, reverse=True):
        print(f"  {kind:32s} x{n:3d}  {t:8.1f} us  {t / n:6.2f} us each  {t / total:5.1%}")
    print(f"  sum of the groups {s:.1f} us ({s / total:.1%} of the step)")


if __name__ == "__main__":
    main()
