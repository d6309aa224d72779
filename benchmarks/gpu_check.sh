#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one command: `python -m benchmarks.gpu --amp` (layer table
# and BAN training-step ratios first), then the test suite's CUDA tests (every test parametrised
# over devices, the fused Triton kernels, no host synchronisation, BAN training on CUDA).
#
#   bash benchmarks/gpu_check.sh OUT [--perm-optim-root PATH] [--ban-root PATH] [benchmarks.gpu flags...]
#
# --perm-optim-root: a checkout of github Cyanogenoid/perm-optim (the paper's released module joins
# the layer table); --ban-root: a checkout of github jnhwkim/ban-vqa (the official model's CUDA tests
# run). Writes OUT/versions.txt, OUT/gpu.json, OUT/gpu.md (gpu_tiny.* with --tiny), OUT/gpu_log.txt,
# OUT/cuda_tests.txt and prints this run's tables and the tests' summary last. Runs from the
# repository root, with the python3 that has torch (the package is taken from src/, no install
# needed). Each part is stopped after its time (SETPERM_BENCH_TIMEOUT, default 300 s;
# SETPERM_TESTS_TIMEOUT, default 200 s), so that both get their turn; benchmarks.gpu rewrites its
# results after each row, so a run stopped part-way keeps the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT [--perm-optim-root PATH] [--ban-root PATH] [flags...]}
shift
bench_args=()
stem=gpu                # benchmarks.gpu's tables: gpu.md, or gpu_tiny.md with --tiny
while [ $# -gt 0 ]; do
    case "$1" in
        --ban-root) export SETPERM_BAN_ROOT="$2"; shift 2 ;;
        --tiny) stem=gpu_tiny; bench_args+=("$1"); shift ;;
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
if torch.cuda.is_available():
    # the dtype cuDNN's LSTM runs in under bfloat16 autocast (the encoder's reader under --amp)
    lstm = torch.nn.LSTM(4, 8, batch_first=True).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print("LSTM output under bfloat16 autocast:", lstm(torch.randn(2, 3, 4, device="cuda"))[0].dtype)
EOF
cat "$out/versions.txt"

# the tables printed below are this run's only: an earlier run's, left in OUT, go first (the benchmark
# replaces them anyway, --overwrite; a run that writes none then shows none)
rm -f "$out/$stem.md" "$out/$stem.json"
timeout "${SETPERM_BENCH_TIMEOUT:-300}" python3 -m benchmarks.gpu --amp --out "$out" --overwrite "${bench_args[@]}" \
    > "$out/gpu_log.txt" 2>&1
bench_rc=$?
[ "$bench_rc" = 124 ] && echo "(stopped after ${SETPERM_BENCH_TIMEOUT:-300} s)" >> "$out/gpu_log.txt"

# every CUDA-parametrised or CUDA-only test (their ids and names contain "cuda"). Stopped as Ctrl-C
# stops it (SIGINT), not by timeout's default SIGTERM, which kills pytest before it reports: then it
# still prints the failures and the short summary of the tests that ran (SIGKILL 30 s later, should
# a test hold the host in a CUDA call that no signal interrupts)
# (the newest GPU paths first: tests/conftest.py orders them by SETPERM_TESTS_FIRST)
SETPERM_TESTS_FIRST="${SETPERM_TESTS_FIRST-test_fused_read.py,test_fused.py,test_devices.py}" \
timeout -s INT -k 30 "${SETPERM_TESTS_TIMEOUT:-200}" python3 -m pytest -q -rfEs -p no:cacheprovider -k cuda tests \
    > "$out/cuda_tests.txt" 2>&1
tests_rc=$?
case "$tests_rc" in
    124|137) echo "(stopped after ${SETPERM_TESTS_TIMEOUT:-200} s)" >> "$out/cuda_tests.txt" ;;
esac

echo "== benchmarks.gpu (exit $bench_rc)"; tail -n 5 "$out/gpu_log.txt"
if [ -f "$out/$stem.md" ]; then
    cat "$out/$stem.md"
else
    echo "(no tables written by this run; its log: $out/gpu_log.txt)"
fi
echo "== CUDA tests (exit $tests_rc)"; tail -n 25 "$out/cuda_tests.txt"
exit $(( tests_rc != 0 || bench_rc != 0 ))
