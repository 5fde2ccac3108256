#!/usr/bin/env bash
# Builds turbokv's wheel, checks that its extension names no path of this machine, installs it
# with torch and transformers in a fresh virtualenv and runs tools/wheel_smoke.py from a
# directory outside the repository (so the installed package is the one imported).
#   bash tools/wheel_smoke.sh        (the build uses $PYTHON, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

"$py" -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/dist" .
wheel=$(ls "$tmp"/dist/turbokv-*.whl)
echo "wheel_smoke: built $(basename "$wheel") in $((SECONDS - t0)) s"

"$py" -m zipfile -e "$wheel" "$tmp/unpacked"
for so in "$tmp"/unpacked/turbokv/_C*.so; do
  dyn=$(readelf -d "$so")
  # Libraries by name only, and a run path relative to the module ($ORIGIN), never absolute.
  if grep -E '\((NEEDED|RPATH|RUNPATH)\)' <<<"$dyn" | grep -Eq '\[/|:/'; then
    echo "wheel_smoke: $(basename "$so") names an absolute path:" >&2
    grep -E '\((NEEDED|RPATH|RUNPATH)\)' <<<"$dyn" >&2
    exit 1
  fi
done

# The same torch and transformers versions as the build environment (from pip's cache).
torch_v=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
tf_v=$("$py" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo "")
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "torch==$torch_v"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$wheel" "transformers${tf_v:+==$tf_v}"
mkdir "$tmp/elsewhere"
(cd "$tmp/elsewhere" && HF_HUB_OFFLINE=1 "$tmp/venv/bin/python" "$repo/tools/wheel_smoke.py")
echo "wheel_smoke: passed in $((SECONDS - t0)) s"
