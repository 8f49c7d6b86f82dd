#!/usr/bin/env bash
# peftlab's CUDA checks from an offline bundle, on a machine without network.
#
#   run-gpu-checks.sh OUTDIR
#
# Uses the machine's own Python and torch (PYTHON, default python3): installs what the checks need
# from this folder's wheels with --no-index into a private folder (the machine's Python is left as
# it is), then runs the CUDA tests and the GPU smoke sweep with time limits. Writes to OUTDIR:
# run.log (everything), machine.json (driver, card, torch), versions.txt, nvidia-smi.txt,
# plugins.txt, cuda-tests.log, and the smoke sweep's results folder gpu-smoke/ (also as
# gpu-smoke.tar.gz) with smoke-summary.txt (a line per cell and what the records must show). Without an NVIDIA driver the CUDA parts are skipped and it says so; with one,
# a torch that does not see the GPU is a failure. Exit status: 0 when everything that ran passed.
#   TEST_TIMEOUT_S (default 150), SWEEP_TIMEOUT_S (default 270), PEFTLAB_COMMIT (default: the
#   commit the bundle was built from), PEFTLAB_TARGET (the private folder; default a new temp one),
#   PEFTLAB_TAR_ONLY=1 (keep the results folder only as gpu-smoke.tar.gz: eight files in all)
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: run-gpu-checks.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
TARGET=${PEFTLAB_TARGET:-$(mktemp -d)/site}
exec > >(tee -a "$OUT/run.log") 2>&1
say() { echo "[peftlab-gpu $(date -u +%H:%M:%S)] $*"; }
failed=()

say "bundle: $HERE; python: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
"$PY" "$HERE/driver.py" describe > "$OUT/machine.json" || failed+=("describe")
if command -v nvidia-smi > /dev/null; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    GPU=1
    say "NVIDIA driver found: $(grep -o 'Driver Version: [0-9.]*' "$OUT/nvidia-smi.txt" | head -1)"
else
    GPU=0
    say "no NVIDIA driver here (nvidia-smi is not on the PATH): the CUDA tests will skip and the smoke sweep will not run"
fi

say "installing the bundle's wheels over the machine's packages into $TARGET"
if ! "$PY" "$HERE/install.py" "$HERE" "$TARGET"; then
    say "FAILED: the install (see above)"
    exit 1
fi
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PEFTLAB_CACHE=${PEFTLAB_CACHE:-$(dirname "$TARGET")/peftlab-cache}
export PEFTLAB_COMMIT=${PEFTLAB_COMMIT:-$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['commit'] or 'unknown')" "$HERE/bundle.json")}

"$PY" - > "$OUT/versions.txt" <<'EOF'
import platform
from importlib import metadata
print("python", platform.python_version())
for name in ("peftlab", "torch", "transformers", "bitsandbytes", "pandas", "sacrebleu", "pytest", "triton"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "(not installed)")
import torch
print("torch.version.cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
cat "$OUT/versions.txt"
say "this torch: $(grep '^torch ' "$OUT/versions.txt") (the machine's own)"

if "$PY" -m peftlab.cli plugins > "$OUT/plugins.txt" 2>&1; then
    say "peftlab plugins: $(grep -c . "$OUT/plugins.txt") lines (plugins.txt)"
else
    failed+=("plugins"); cat "$OUT/plugins.txt"
fi

if [ "$GPU" = 1 ] && ! "$PY" "$HERE/driver.py" check cuda "$PY"; then
    failed+=("torch-sees-no-gpu")
    say "FAILED: there is an NVIDIA driver but this torch does not see the GPU (above); the CUDA parts did not run"
    GPU=skip
fi

if [ "$GPU" != skip ]; then
    say "CUDA tests (limit ${TEST_TIMEOUT_S:-150} s)"
    ( cd "$HERE/checks" && PEFTLAB_REQUIRE_CUDA=$([ "$GPU" = 1 ] && echo 1 || echo 0) \
        timeout "${TEST_TIMEOUT_S:-150}" "$PY" -m pytest -m cuda tests/cuda -v -rs -s -p no:cacheprovider ) \
        > "$OUT/cuda-tests.log" 2>&1
    status=$?
    tail -n 25 "$OUT/cuda-tests.log"
    [ $status -eq 0 ] || failed+=("cuda-tests (exit $status)")
    [ "$GPU" = 0 ] && say "the CUDA tests were collected and skipped: no GPU here"
fi

if [ "$GPU" = 1 ]; then
    say "GPU smoke sweep (limit ${SWEEP_TIMEOUT_S:-270} s)"
    timeout "${SWEEP_TIMEOUT_S:-270}" "$PY" -m peftlab.cli sweep "$HERE/checks/experiments/gpu_smoke.toml" \
        --out "$OUT/gpu-smoke" --no-progress
    status=$?
    [ $status -eq 0 ] || failed+=("smoke-sweep (exit $status)")
    "$PY" -m peftlab.gpu.smoke "$OUT/gpu-smoke" > "$OUT/smoke-summary.txt" 2>&1 || failed+=("smoke-checks")
    cat "$OUT/smoke-summary.txt"
    tar czf "$OUT/gpu-smoke.tar.gz" -C "$OUT" gpu-smoke 2> /dev/null \
        && [ "${PEFTLAB_TAR_ONLY:-0}" = 1 ] && rm -rf "$OUT/gpu-smoke"
else
    say "the GPU smoke sweep was skipped: no GPU here"
fi

if [ ${#failed[@]} -eq 0 ]; then
    say "done: everything that ran passed$([ "$GPU" = 1 ] || echo ' (the CUDA parts were skipped)')"
    exit 0
fi
say "done, with failures: ${failed[*]}"
exit 1
