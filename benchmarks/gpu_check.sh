#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: the test suite's CUDA tests (every test
# parametrised over devices, the fused Triton kernels, no host synchronisation, BAN training on
# CUDA), then `python -m benchmarks.gpu --amp` (layer table and BAN training-step ratios).
#
#   bash benchmarks/gpu_check.sh OUT [--perm-optim-root PATH] [--ban-root PATH] [benchmarks.gpu flags...]
#
# --perm-optim-root: a checkout of github Cyanogenoid/perm-optim (the paper's released module joins
# the layer table); --ban-root: a checkout of github jnhwkim/ban-vqa (the official model's CUDA tests
# run). Writes OUT/versions.txt, OUT/cuda_tests.txt, OUT/gpu.json, OUT/gpu.md, OUT/gpu_log.txt and
# prints the tests' summary and the markdown tables last. Runs from the repository root, with the
# python3 that has torch (the package is taken from src/, no install needed). benchmarks.gpu rewrites
# its results after each row, so a run stopped part-way keeps the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [--perm-optim-root PATH] [--ban-root PATH] [flags...]}
shift
bench_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ban-root) export SETPERM_BAN_ROOT="$2"; shift 2 ;;
        *) bench_args+=("$1"); shift ;;
    esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

python3 - > "$out/versions.txt" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF
cat "$out/versions.txt"

# every CUDA-parametrised or CUDA-only test (their ids and names contain "cuda"), stopped after
# SETPERM_TESTS_TIMEOUT seconds (default 300) so that the benchmark always gets its turn
timeout "${SETPERM_TESTS_TIMEOUT:-300}" python3 -m pytest -q -rfEs -p no:cacheprovider -k cuda tests \
    > "$out/cuda_tests.txt" 2>&1
tests_rc=$?
[ "$tests_rc" = 124 ] && echo "(stopped after ${SETPERM_TESTS_TIMEOUT:-300} s)" >> "$out/cuda_tests.txt"

python3 -m benchmarks.gpu --amp --out "$out" --overwrite "${bench_args[@]}" > "$out/gpu_log.txt" 2>&1
bench_rc=$?

echo "== CUDA tests (exit $tests_rc)"; tail -n 25 "$out/cuda_tests.txt"
echo "== benchmarks.gpu (exit $bench_rc)"; tail -n 5 "$out/gpu_log.txt"
[ -f "$out/gpu.md" ] && cat "$out/gpu.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
