#!/usr/bin/env bash
# The GPU checks a change needs, on the GPU machine (device tool), from the repository root:
#   bash tools/gpu_check.sh STEP...
# Steps run in order, on one build:
#   smoke      the smoke tier, pytest -m "cuda and smoke" (tests/conftest.py: each parameter
#              value of each CUDA test once; every kernel, format, head dim and mask type)
#   I/N        shard I (0-based) of N of the full CUDA tier (a stable hash of the test ids;
#              4 shards each fit one call)
#   all        the whole CUDA tier (longer than one call allows: use shards)
#   sanitize   compute-sanitizer memcheck and racecheck over tools/sanitize_attention.py
#              (every attention kernel once per format family, head dim and mask)
#   bench      benchmarks/bench_attention.py with $TURBOKV_BENCH_ARGS
#   warm       every attention kernel once, in one process (tools/sanitize_attention.py): on a
#              PTX-only build the driver then compiles each kernel once into its cache
#              (CUDA_CACHE_MAXSIZE is raised to 4 GiB here) instead of once per pytest worker
# Typical use: one call `build smoke` (about 5 minutes on an H100, the build 4 of them), whose
# extension comes back; a later call carries it in .prebuilt/ and runs `0/4 1/4 2/4 3/4` (about
# 50 s a shard) and `sanitize` without building again. A PTX-only build: `build warm smoke`.
#
# Build: TORCH_CUDA_ARCH_LIST picks the architectures (unset: the GPU present, sm_90a on a
# Hopper; "8.0+PTX" is the PTX-only path that GPUs outside the wheel list take, JIT-compiled by
# the driver). The extension is left in $OUT gzipped in pieces under the device tool's 16 MiB a
# file (_C.so.gz.aa, ...), with its file name (_C.name) and a hash of the sources and the
# architecture list it was built from (_C.sources): put them in .prebuilt/ here and carry it
# (with .whl, the gguf wheel); a later call then skips the build (minutes of device time), and
# refuses a stale extension.
#
# Each pytest step writes $OUT/results_<step>.log as tests end (one line a result, failures with
# their message), so a run cut off by the call's time limit still names its failures.
# TURBOKV_PYTEST_ARGS: more pytest arguments (default "-n 8 --timeout 300").
set -uo pipefail
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16 CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
out=${OUT:-/tmp/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
sources() {
  { find cpp CMakeLists.txt pyproject.toml -type f | LC_ALL=C sort | xargs sha1sum; echo "${TORCH_CUDA_ARCH_LIST:-}"; } |
    sha1sum | cut -c1-16
}
# _C.sources: the hash, then the TORCH_CUDA_ARCH_LIST it was built with (the machine may set one:
# leave it as it is from call to call, or the carried extension is refused).
arch=${TORCH_CUDA_ARCH_LIST-(unset)}
name=$(cat .prebuilt/_C.name 2>/dev/null)
if [ -n "$name" ] && ls .prebuilt/_C.so.gz.* >/dev/null 2>&1 && [ "$(head -1 .prebuilt/_C.sources 2>/dev/null)" = "$(sources)" ]; then
  cat .prebuilt/_C.so.gz.* | gunzip >"python/turbokv/$name"
  echo "prebuilt extension: $name (sources $(sources), TORCH_CUDA_ARCH_LIST $arch)"
else
  [ -e .prebuilt/_C.name ] && echo "the extension in .prebuilt/ was built from other sources or with" \
    "TORCH_CUDA_ARCH_LIST $(sed -n 2p .prebuilt/_C.sources 2>/dev/null) (this call: $arch): building"
  t0=$(date +%s)
  TURBOKV_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || {
    tail -50 "$out/build.log"
    exit 1
  }
  echo "build: $(($(date +%s) - t0)) s"
  so=$(python3 -c 'import turbokv._C as c; print(c.__file__)')
  basename "$so" >"$out/_C.name" && gzip -c "$so" | split -b 15M - "$out/_C.so.gz." && { sources; echo "$arch"; } >"$out/_C.sources"
  rm -f "$out/build.log"
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import turbokv; print('WITH_CUDA', turbokv._C.WITH_CUDA, turbokv._C.CUDA_ARCHS, 'native cuda', turbokv.native_loaded('cuda'), turbokv._C.cuda_device_config(0))" || exit 1

status=0
pytest_step() {  # name, then pytest selection arguments
  local step=$1 t0
  shift
  t0=$(date +%s)
  python3 -m pytest -q -rfE -p no:cacheprovider ${TURBOKV_PYTEST_ARGS:--n 8 --timeout 300} \
    --results-log "$out/results_$step.log" "$@" tests 2>&1 | tail -15
  local rc=${PIPESTATUS[0]}
  echo "step $step: $(($(date +%s) - t0)) s, $(grep -c '^PASSED' "$out/results_$step.log" 2>/dev/null) passed," \
    "$(grep -c '^FAILED' "$out/results_$step.log" 2>/dev/null) failed, rc $rc"
  grep -A3 '^FAILED' "$out/results_$step.log" 2>/dev/null | head -40
  [ "$rc" = 0 ] || status=1
}
for step in "$@"; do
  case "$step" in
    build) ;;
    smoke) pytest_step smoke -m "cuda and smoke" ;;
    all) pytest_step all -m cuda ;;
    [0-9]*/[0-9]*) pytest_step "shard${step%/*}of${step#*/}" -m cuda --shard "$step" ;;
    sanitize)
      for tool in memcheck racecheck; do
        t0=$(date +%s)
        compute-sanitizer --tool "$tool" --error-exitcode 9 python3 tools/sanitize_attention.py >"$out/sanitize_$tool.log" 2>&1
        rc=$?
        echo "sanitize $tool: rc $rc, $(($(date +%s) - t0)) s"
        tail -5 "$out/sanitize_$tool.log"
        [ "$rc" = 0 ] || status=1
      done
      ;;
    bench) python3 benchmarks/bench_attention.py ${TURBOKV_BENCH_ARGS:-} 2>&1 | tee "$out/bench_attention.log" ;;
    warm)
      t0=$(date +%s)
      python3 tools/sanitize_attention.py | tail -1
      echo "warm: $(($(date +%s) - t0)) s"
      ;;
    *)
      echo "gpu_check: unknown step '$step' (expected build, smoke, I/N, all, sanitize, warm or bench)"
      exit 2
      ;;
  esac
done
exit $status
