#!/usr/bin/env bash
# The whole GPU check in one run, for a lent or rented CUDA machine:
#   1. the `cuda`-marked tests (tiny end-to-end training in fp16/bf16 x AdamW/8-bit Adam/Adafactor x LoRA/full),
#   2. benchmarks/gpu_sdxl_step.py (SDXL-size SmPO vs Diffusion-DPO steps).
# Logs and the benchmark's table land in OUT_DIR; copy them into benchmarks/results/ and commit them.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BENCHMARK_BUDGET_S [BENCHMARK_ARGS...]]     (budget 0: the tests alone)
#   e.g. bash benchmarks/gpu_check.sh $OUT 300 --only "full bf16 adamw +copy" "full bf16 adamw +copy +compile"
#
# Packages missing on the machine may be put beside the repository as wheels in .whl/ (installed with --no-deps
# into /tmp/site, which then goes first on PYTHONPATH); the package itself is used from src/.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [BENCHMARK_BUDGET_S [BENCHMARK_ARGS...]]}
budget=${2:-300}
shift $(( $# < 2 ? $# : 2 ))
benchmark_args=("$@")  # passed on to gpu_sdxl_step.py
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "${budget%.*}" -gt 0 ]; then  # a mistyped set-up name fails here, before the tests spend device time
    python3 benchmarks/gpu_sdxl_step.py --output "$out/gpu_sdxl_step.md" --time_budget_s "$budget" \
        "${benchmark_args[@]}" --check_args || { echo "bad benchmark arguments: $*"; exit 2; }
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
for name in ("diffusers", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report, do not stop: the tests say what they need
        print(name, "unavailable:", error)
EOF
} 2>&1 | tee "$out/environment.txt"

# One process per test where pytest-xdist is there: each test builds an Accelerator, and a process that builds many
# once crashed (SIGSEGV) in accelerate's os.environ update racing a native thread left by an earlier test.
parallel=()
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n auto); fi  # 16 CPUs there: one test per process
timeout 150 python3 -m pytest -m cuda tests/test_cuda.py "${parallel[@]}" -q -rs -p no:cacheprovider 2>&1 \
    | tee "$out/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

bench_status=0
if [ "${budget%.*}" -gt 0 ]; then  # a budget of 0 runs the tests alone
    timeout $((${budget%.*} + 90)) python3 benchmarks/gpu_sdxl_step.py --output "$out/gpu_sdxl_step.md" \
        --time_budget_s "$budget" "${benchmark_args[@]}" 2>&1 | tee "$out/gpu_sdxl_step.log"
    bench_status=${PIPESTATUS[0]}
fi

echo "cuda tests exit $tests_status; benchmark exit $bench_status"
exit $(( tests_status != 0 || bench_status != 0 ))
