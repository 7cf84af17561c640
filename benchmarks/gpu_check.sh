#!/usr/bin/env bash
# The whole GPU check in one run, for a lent or rented CUDA machine:
#   1. the `cuda`-marked tests (tiny end-to-end training in fp16/bf16 x AdamW/8-bit Adam/Adafactor x LoRA/full),
#   2. benchmarks/gpu_sdxl_step.py (SDXL-size SmPO vs Diffusion-DPO steps).
# Logs and the benchmark's table land in OUT_DIR; copy them into benchmarks/results/ and commit them.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_S [BENCHMARK_ARGS...]]     (budget 0: the tests alone)
#   e.g. bash benchmarks/gpu_check.sh $OUT 300 --only "full bf16 adamw +copy" "full bf16 adamw +copy +compile"
#
# BUDGET_S (default 300) is the benchmark's --time_budget_s, in whole seconds (so not among BENCHMARK_ARGS). The
# whole run must fit one command of a lent machine: BUDGET_S plus 300 s (60 s for installs, environment and
# imports, 150 s of tests, 90 s for the benchmark's last set-up) may not exceed GPU_CHECK_LIMIT_S (default 600;
# 0: no limit, for a machine of one's own). A bad BUDGET_S or GPU_CHECK_LIMIT_S, or --time_budget_s among the
# benchmark arguments, exits 2 before anything runs; other bad benchmark arguments (e.g. a mistyped --only name) exit
# 2 after environment.txt is written, before the tests.
#
# Packages missing on the machine may be put beside the repository as wheels in .whl/ (installed with --no-deps
# into /tmp/site, which then goes first on PYTHONPATH); the package itself is used from src/.
set -uo pipefail
usage="usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_S [BENCHMARK_ARGS...]]  (BUDGET_S: whole seconds >= 0, \
default 300; 0 runs the tests alone)"
refuse() { echo "gpu_check.sh: $*" >&2; echo "$usage" >&2; exit 2; }
tests_limit_s=150 last_setup_allowance_s=90 setup_allowance_s=60

[ $# -ge 1 ] && [ -n "$1" ] || refuse "OUT_DIR is missing"
out=$1
budget=${2-300}  # given but empty: refused below
shift $(( $# < 2 ? $# : 2 ))
benchmark_args=("$@")  # passed on to gpu_sdxl_step.py
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    hint=""
    [[ $budget == -* ]] && hint=" (BUDGET_S forgotten before the benchmark arguments?)"
    refuse "BUDGET_S must be a whole number of seconds >= 0, got '$budget'$hint"
fi
budget=$((10#$budget))  # no octal for a leading 0
limit=${GPU_CHECK_LIMIT_S:-600}
[[ $limit =~ ^[0-9]+$ ]] || refuse "GPU_CHECK_LIMIT_S must be a whole number of seconds >= 0, got '$limit'"
limit=$((10#$limit))
if [ "$budget" -gt 0 ]; then
    for arg in "${benchmark_args[@]}"; do
        case $arg in --time_budget_s | --time_budget_s=*)
            refuse "the benchmark's --time_budget_s is BUDGET_S, the second argument: not one of BENCHMARK_ARGS";;
        esac
    done
    rest=$((setup_allowance_s + tests_limit_s + last_setup_allowance_s))
    if [ "$limit" -gt 0 ] && [ $((budget + rest)) -gt "$limit" ]; then
        refuse "BUDGET_S $budget + ${rest} s (installs and imports ${setup_allowance_s} s, tests ${tests_limit_s} s," \
            "the benchmark's last set-up ${last_setup_allowance_s} s) exceeds the ${limit} s limit of one command:" \
            "use BUDGET_S <= $((limit - rest)), or set GPU_CHECK_LIMIT_S (0: no limit) on a machine of your own"
    fi
elif [ ${#benchmark_args[@]} -gt 0 ]; then
    refuse "BUDGET_S 0 runs the tests alone: the benchmark arguments '${benchmark_args[*]}' would be ignored"
fi

[ -f benchmarks/gpu_sdxl_step.py ] && [ -d src ] || refuse "run it from the repository root (here: $PWD)"

mkdir -p "$out"
wheels=0
if compgen -G ".whl/*.whl" >/dev/null; then
    wheels=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "huggingface_hub", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report, do not stop: the tests and the benchmark's check say what they need
        print(name, "unavailable:", error)
if "torch" in sys.modules:
    import torch
    print("cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
} 2>&1 | tee "$out/environment.txt"

if [ "$budget" -gt 0 ]; then  # bad arguments or a missing package fail here, before the tests spend device time
    python3 benchmarks/gpu_sdxl_step.py --output "$out/gpu_sdxl_step.md" --time_budget_s "$budget" \
        "${benchmark_args[@]}" --check_args
    check_status=$?
    if [ "$check_status" -eq 2 ]; then  # argparse's exit status
        echo "bad benchmark arguments: ${benchmark_args[*]}"
        exit 2
    elif [ "$check_status" -ne 0 ]; then
        carried="no .whl/ was carried"
        [ "$wheels" -eq 1 ] && carried="the wheels in .whl/ were installed"
        echo "gpu_sdxl_step.py cannot run (exit $check_status; its error is above). A missing package must be carried" \
            "as a wheel in .whl/ ($carried; see $out/environment.txt)."
        exit 1
    fi
fi

# One process per test where pytest-xdist is there: each test builds an Accelerator, and a process that builds many
# once crashed (SIGSEGV) in accelerate's os.environ update racing a native thread left by an earlier test.
parallel=()
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n auto); fi  # 16 CPUs there: one test per process
timeout "$tests_limit_s" python3 -m pytest -m cuda tests/test_cuda.py "${parallel[@]}" -q -rs -p no:cacheprovider 2>&1 \
    | tee "$out/cuda_tests.log"
tests_status=${PIPESTATUS[0]}

bench_status=0
if [ "$budget" -gt 0 ]; then  # a budget of 0 runs the tests alone
    timeout $((budget + last_setup_allowance_s)) python3 benchmarks/gpu_sdxl_step.py \
        --output "$out/gpu_sdxl_step.md" --time_budget_s "$budget" "${benchmark_args[@]}" 2>&1 \
        | tee "$out/gpu_sdxl_step.log"
    bench_status=${PIPESTATUS[0]}
fi

echo "cuda tests exit $tests_status; benchmark exit $bench_status"
exit $(( tests_status != 0 || bench_status != 0 ))
