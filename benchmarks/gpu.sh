#!/usr/bin/env bash
# The GPU checks of issue 4 in one prepared run, for a lent NVIDIA GPU machine (the `device` tool's `run`), whose
# python3 has its own torch (2.11 when last seen) and no network. Beforehand, on this machine:
#   pip download --no-deps -d .whl timm==1.0.31      (.whl/ is git-ignored; carry it: carry=[".whl"])
# then, in the repository root there: bash benchmarks/gpu.sh   (4-6 minutes, at most 9; timeout_s=590)
# Writes env.txt, bench.log and gpu_tests.log under $OUT (or ./gpu_out when run elsewhere).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/timm-1.0.31-py3-none-any.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE  # it would make cuBLAS use TF32 in the fp32 rows, whatever allow_tf32 says
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, timm
print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda,
      "cuDNN", torch.backends.cudnn.version(), "timm", timm.__version__, timm.__file__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1
ARGS=(bench --device cuda --models gcvit_tiny --batches 16 256 --dtypes fp32 bf16 --train-models gcvit_tiny
      --train-batch 256 --train-dtypes fp32 bf16 --train-drop-path 0 recipe --repeats 10)
timeout 240 python3 -m gcvit.cli "${ARGS[@]}" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then  # a crash, not a timeout: PyTorch's cuDNN attention has failed on some
    # mask shapes; once more with it last in line
    TORCH_CUDNN_SDPA_DEPRIORITIZED=1 timeout 150 python3 -m gcvit.cli "${ARGS[@]}" 2>&1 | tee "$OUT/bench_retry.log"
fi
timeout 150 python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
exit "${PIPESTATUS[0]}"
