#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200 with torch, triton and nvcc preinstalled, no
# internet): build the extension with the CUDA kernels in place, run the GPU op tests (CUDA,
# Triton and the ops door; CI covers the CPU kernels), run the GPU benchmark. Everything useful
# lands in $OUT (default ./gpu_out), at most 12 files:
#   summary.txt build.log pytest.log junit.xml bench.log gpu_bench.json sparse_bench.log
#   sparse_headline.log gpu_sparse_bench.json gpu_sparse_headline.json bsr_bench.log gpu_bsr_bench.json.
# Runs every step even when one fails; exits nonzero if any failed. Step limits add up to 585 s,
# so the whole script stays under 10 minutes (run it with timeout_s=600).
#   bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for bench/ scripts too
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=()

log() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS LOGFILE CMD...: runs CMD under a time limit, output to LOGFILE and the console.
step() {
  local name=$1 limit=$2 logfile=$3
  shift 3
  local t0=$SECONDS rc
  log "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logfile"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    log "=== $name: ok in $((SECONDS - t0)) s"
  else
    log "=== $name: FAILED (rc=$rc$([ "$rc" -eq 124 ] && echo ', timed out')) after $((SECONDS - t0)) s"
    failed+=("$name")
  fi
}

{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  command -v nvcc && nvcc --version | tail -1
} 2>&1 | tee -a "$SUMMARY"

# torch finds the toolkit through CUDA_HOME or `which nvcc`; a wrapper script on the PATH
# (as on the dev machine) would point it at the wrong folder, so name it when it is standard.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

step build 240 "$OUT/build.log" env SPARSEQ_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
  "$PY" setup.py build_ext --inplace

"$PY" -c "import sparseq; print('HAS_EXT', sparseq.HAS_EXT, 'with_cuda', getattr(getattr(sparseq, '_C', None), 'with_cuda', None), 'archs', sparseq._C.cuda_archs() if sparseq.HAS_EXT else None, sparseq.EXT_ERROR or '')" 2>&1 | tee -a "$SUMMARY"

step pytest 200 "$OUT/pytest.log" env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 \
  "$PY" -m pytest tests/ops/test_int8_cuda.py tests/ops/test_int8_triton.py tests/ops/test_ops_api.py \
  tests/ops/test_sparse_cuda.py tests/ops/test_bsr_triton.py tests/ops/test_int8_static.py -q -rs -m "not slow" -p no:cacheprovider --junitxml="$OUT/junit.xml"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -1 | tee -a "$SUMMARY"

step bench 40 "$OUT/bench.log" env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 \
  "$PY" bench/bench_int8_gpu.py --quick --json "$OUT/gpu_bench.json"
grep -E "speedup|ERROR" "$OUT/bench.log" >> "$SUMMARY"

# Sparse kernels: the full set with the default per-call content check, then the 2:4 headline
# cases without it (SPARSEQ_CUDA_CONTENT_CHECKS=0 drops the flag read, a device sync).
step sparse_bench 40 "$OUT/sparse_bench.log" env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 \
  "$PY" bench/bench_sparse_gpu.py --quick --json "$OUT/gpu_sparse_bench.json"
step sparse_headline 15 "$OUT/sparse_headline.log" env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 \
  SPARSEQ_CUDA_CONTENT_CHECKS=0 "$PY" bench/bench_sparse_gpu.py --quick --headline \
  --json "$OUT/gpu_sparse_headline.json"
grep -E "speedup|ERROR" "$OUT/sparse_bench.log" "$OUT/sparse_headline.log" >> "$SUMMARY"

# Block sparse (Triton): 90% of 32x32 blocks against dense bf16 at 4096^3 and a few neighbours.
step bsr_bench 50 "$OUT/bsr_bench.log" env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 \
  "$PY" bench/bench_bsr_gpu.py --quick --json "$OUT/gpu_bsr_bench.json"
grep -E "speedup|ERROR|target" "$OUT/bsr_bench.log" >> "$SUMMARY"

if [ ${#failed[@]} -eq 0 ]; then
  log "ALL STEPS OK"
  exit 0
fi
log "FAILED STEPS: ${failed[*]}"
exit 1
