#!/usr/bin/env bash
# One GPU-machine session: build with the CUDA kernels, run the CUDA tests, then the
# attention benchmark. Usage there: bash tools/gpu_check.sh [pytest -k expr] [bench args...]
# Logs go to $OUT (the device tool brings them back). Carry .whl (the gguf wheel).
# TURBOKV_PYTEST_ARGS: more pytest arguments (e.g. "-n 12 -v" with the pytest-xdist wheel carried:
# a PTX-only build's driver JIT then compiles kernels in several processes at once; -v names each
# result as it comes, so a run cut off by the call's limit still names its failures).
# TURBOKV_TEST_PATHS: the test files to run (default: tests), to split a long run between calls.
# Each build leaves the extension, gzipped in pieces under the device tool's 16 MiB a file
# (_C.so.gz.aa, ...), its file name (_C.name) and a hash of the sources it was built from
# (_C.sources) in $OUT: put them in .prebuilt/ here and carry it (with .whl), and a later call
# with TURBOKV_PREBUILT=1 skips the build (minutes of device time), refusing a stale extension.
set -uo pipefail
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
out=${OUT:-/tmp/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
sources() { find cpp CMakeLists.txt pyproject.toml -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-16; }
if [ -n "${TURBOKV_PREBUILT:-}" ]; then
  name=$(cat .prebuilt/_C.name 2>/dev/null)
  if [ -z "$name" ] || ! ls .prebuilt/_C.so.gz.* >/dev/null 2>&1 || [ "$(cat .prebuilt/_C.sources 2>/dev/null)" != "$(sources)" ]; then
    echo "TURBOKV_PREBUILT: no extension in .prebuilt/, or it was built from other C++/CUDA sources: build instead"
    exit 1
  fi
  cat .prebuilt/_C.so.gz.* | gunzip >"python/turbokv/$name" && export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  echo "prebuilt extension: $name (sources $(sources))"
else
  t0=$(date +%s)
  TURBOKV_CUDA=ON python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
  echo "build: $(($(date +%s) - t0)) s"
  so=$(python3 -c 'import turbokv._C as c; print(c.__file__)')
  basename "$so" >"$out/_C.name" && gzip -c "$so" | split -b 15M - "$out/_C.so.gz." && sources >"$out/_C.sources"
  rm -f "$out/build.log"
fi
python3 -c "import turbokv; print('WITH_CUDA', turbokv._C.WITH_CUDA, turbokv._C.CUDA_ARCHS, 'native cuda', turbokv.native_loaded('cuda'), turbokv._C.cuda_device_config(0))"
kexpr=${1:-}
python3 -m pytest -rfs -m cuda ${TURBOKV_PYTEST_ARGS:-} ${kexpr:+-k "$kexpr"} ${TURBOKV_TEST_PATHS:-tests} 2>&1 | tee "$out/pytest_cuda.log" | tail -40
shift || true
if [ "${1:-}" != "nobench" ]; then
  python3 benchmarks/bench_attention.py "$@" 2>&1 | tee "$out/bench_attention.log"
fi
