#!/usr/bin/env bash
# Every GPU check and measurement of sqlab in one go, for a machine with an NVIDIA GPU:
# the gpu-marked tests, benchmarks/kernels.py (LLaMA-7B/13B shapes, 1-8 tokens),
# benchmarks/generate.py (a LLaMA-7B-shaped model, with a profile of a few decoding
# tokens), and, where Nsight Compute is installed, its report on the 3/4-bit 1-token kernels.
#
#     bash benchmarks/gpu_all.sh [OUTDIR]     # default benchmarks/results
#
# Results are named by device: OUTDIR/<device>-kernels.json, -generate.json, -profile.txt,
# -ncu.txt and -tests.log; `sqlab report` reads the JSON from benchmarks/results/.
set -uo pipefail
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
    echo "no CUDA GPU visible to torch: nothing to measure" >&2; exit 2; }
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true

echo "== gpu-marked tests"
# the files that hold gpu-marked tests (the others may need packages a GPU image lacks)
"$py" -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) 2>&1 \
    | tee "$out/$device-tests.log" || status=1

echo "== benchmarks/kernels.py"
"$py" benchmarks/kernels.py --shapes all --tokens 1,2,4,8 --json "$out/$device-kernels.json" || status=1

echo "== benchmarks/generate.py"
"$py" benchmarks/generate.py --json "$out/$device-generate.json" --profile "$out/$device-profile.txt" || status=1

if command -v ncu >/dev/null; then
    echo "== Nsight Compute: 3/4-bit LUT-GEMV, 1 token, LLaMA-7B MLP shapes"
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats -k regex:lut_gemv \
        "$py" - > "$out/$device-ncu.txt" 2>&1 <<'PY' || status=1
import sys
import torch
sys.path.insert(0, "benchmarks")
from kernels import random_packed
from sqlab import kernels
for n, k in ((11008, 4096), (4096, 11008)):
    for wbits in (3, 4):
        qweight, lut, _ = random_packed(n, k, wbits, 0.0, "cuda")
        x = torch.randn(1, k, device="cuda").half()
        kernels.lut_gemv(qweight, lut, x, wbits, k)
torch.cuda.synchronize()
PY
    grep -E "lut_gemv|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued" \
        "$out/$device-ncu.txt" | head -80
fi
exit $status
