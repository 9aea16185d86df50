#!/usr/bin/env bash
# Check PyTorch's CUDA normalization kernels against the refnorm oracle.
#
#   scripts/gpu_oracle.sh [OUTDIR]          (default OUTDIR: oracle-gpu-report)
#
# Needs only PyTorch with CUDA (and refnorm's own numpy/scipy); refnorm is used from this
# checkout, no install needed. For float32, float16 and bfloat16 it runs
#
#   refnorm compare --impl torch --device cuda --dtype float32 float16 bfloat16
#
# i.e. every variant with a PyTorch equivalent, forward and backward, on every oracle case,
# and writes OUTDIR/report.txt (the tables and the failures), OUTDIR/report.json (every case,
# every output: worst ULP, tolerance, max abs/rel error, worst index) and OUTDIR/environment.txt.
# Exit status: 0 all passed, 1 a failure, 2 could not run (no CUDA, no PyTorch).
# Environment: PYTHON (default python3), SIZE (full or ci, default full), EXTRA (more
# arguments for `refnorm compare`, e.g. "--strict" or "--variant layer_norm"), DEVICE
# (default cuda; DEVICE=cpu is a dry run of this script on a machine without a GPU).
set -euo pipefail

OUT="${1:-oracle-gpu-report}"
PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-full}"
DEVICE="${DEVICE:-cuda}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

"$PYTHON" - "$OUT/environment.txt" "$DEVICE" <<'PY' || exit 2
import platform, sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_oracle.sh: PyTorch is not installed ({exc})")
cuda = sys.argv[2].startswith("cuda")
if cuda and not torch.cuda.is_available():
    sys.exit(f"gpu_oracle.sh: CUDA is not available to PyTorch {torch.__version__} "
             f"(torch.version.cuda={torch.version.cuda}); run this on a GPU machine")
import numpy, refnorm
lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
         f"cuda {torch.version.cuda}", f"cudnn {torch.backends.cudnn.version()}",
         (f"device {torch.cuda.get_device_name(0)} (capability "
          f"{torch.cuda.get_device_capability(0)})") if cuda else f"device {sys.argv[2]}",
         f"numpy {numpy.__version__}", f"refnorm {refnorm.__version__}"]
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY

set +e
# shellcheck disable=SC2086
"$PYTHON" -m refnorm.cli compare --impl torch --device "$DEVICE" \
    --dtype float32 float16 bfloat16 --size "$SIZE" --no-progress \
    --report "$OUT/report.txt" --json "$OUT/report.json" ${EXTRA:-}
status=$?
set -e
echo "gpu_oracle.sh: exit status $status; report in $OUT/report.txt and $OUT/report.json"
exit "$status"
