#!/usr/bin/env bash
# Create benchmarks/.venv-peers: sharpmeter (editable, with the [hf] extra) plus the peer tools
# that benchmarks/peers/ measures against (python -m benchmarks.peers), all from PyPI.
#
#   bash benchmarks/setup_peers.sh            # create or update the venv
#   PYTHON=python3.11 bash benchmarks/setup_peers.sh
#
# torch is installed FIRST and pinned for every later step by a constraints file, so pip can never
# replace it with another build (e.g. a CUDA wheel pulled in by a peer's requirements). Every
# peer declares a loose torch requirement (torch>=2.0 / >=2.3), which 2.13.0 satisfies.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv-peers"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PEERS=(pyhessian curvlinops-for-pytorch hessian-eigenthings)

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

echo "== torch $TORCH_VERSION (first, CPU build from local wheels or PyPI's CPU index)"
"${PIP[@]}" install "torch==$TORCH_VERSION"

echo "== sharpmeter (editable) with the [hf] extra"
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$REPO[hf]"

echo "== peers"
failed=()
for peer in "${PEERS[@]}"; do
    if ! "${PIP[@]}" install -c "$CONSTRAINTS" "$peer"; then
        echo "!! $peer did not install with its dependencies; trying --no-deps" >&2
        "${PIP[@]}" install --no-deps "$peer" || failed+=("$peer (install)")
    fi
done

# backpack-for-pytorch (a curvlinops dependency) asks for torchvision, and PyPI's torchvision wheel
# is built against CUDA torch: with the CPU torch it fails at import ("operator torchvision::nms
# does not exist"). Only backpack.utils.examples uses it, so drop it rather than leave a broken
# package that transformers would find and try to import.
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "== removing torchvision (PyPI's CUDA-built wheel does not load with the CPU torch)"
    "${PIP[@]}" uninstall -y torchvision || true
fi

echo "== import check"
for module in pyhessian curvlinops hessian_eigenthings sharpmeter transformers; do
    if "$VENV/bin/python" -c "import $module" 2>/tmp/import_err_$$; then
        echo "ok   $module"
    else
        echo "FAIL $module: $(tail -n 1 /tmp/import_err_$$)"
        failed+=("$module (import)")
    fi
done
rm -f /tmp/import_err_$$
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "ready: $VENV/bin/python -m benchmarks.peers (from $REPO)"
