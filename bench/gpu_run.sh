#!/bin/bash
# Everything the GPU checks need, in one device call (the device tool's machine: a bare image
# with PyTorch and numba-cuda, NumPy 2.4 carried in .whl/). Writes logs under $OUT.
#   bench/gpu_run.sh [tests|graph-tests|generate|bench|formats|tune-model|decode|graph-profile|
#                     cli-bench|profile]...   (default: tests generate bench cli-bench)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
steps=${*:-tests generate bench cli-bench}
na() { python3 -m numba_attn.cli "$@"; }
for step in $steps; do
  case $step in
  tests)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/machine.txt"
    python3 -c "import numba, numpy, numba_cuda, torch; print('numba', numba.__version__, 'numpy', numpy.__version__, 'numba-cuda', getattr(numba_cuda, '__version__', '?'), 'torch', torch.__version__)" | tee -a "$OUT/machine.txt"
    python3 -m pytest -q -p no:cacheprovider tests/cuda 2>&1 | tee "$OUT/tests_cuda.txt" ;;
  graph-tests)
    python3 -m pytest -q -p no:cacheprovider tests/cuda/test_decode_graph.py \
      tests/cuda/test_model_cuda.py tests/cuda/test_linear_formats_cuda.py 2>&1 \
      | tee "$OUT/tests_graph.txt" ;;
  formats)
    python3 bench/bench_cuda.py --only formats,tune-q8 2>&1 | tee "$OUT/bench_formats.txt" ;;
  tune-model)
    python3 bench/bench_cuda.py --only tune-gemv-model,tune-q8-model 2>&1 | tee "$OUT/tune_gemv_model.txt" ;;
  decode)
    python3 bench/bench_cuda_decode.py --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" ;;
  graph-profile)
    for w in float32 float16 q8_0; do python3 bench/profile_decode_graph.py --weight-dtype $w
    done 2>&1 | tee "$OUT/graph_profile.txt" ;;
  generate)
    P="It is a truth universally acknowledged"
    { for i in 1 2; do na generate "$P" --device cuda --max-tokens 64 --seed 1; done
      na generate "$P" --device cuda --weight-dtype float16 --max-tokens 64 --seed 1
      na generate "$P" --device cpu --max-tokens 64 --seed 1; } 2>&1 | tee "$OUT/generate.txt" ;;
  bench)
    python3 bench/bench_cuda.py 2>&1 | tee "$OUT/bench_cuda.txt" ;;
  profile)
    python3 bench/profile_cuda_host.py 2>&1 | tee "$OUT/profile.txt" ;;
  cli-bench)
    { na bench kernels --device cuda --format md
      na bench model --device cuda --format md
      na bench model --device cuda --weight-dtype float16 --format md
      na bench model --device cuda --model numba_attn/models/demo --format md; } 2>&1 | tee "$OUT/cli_bench.txt" ;;
  esac
done
