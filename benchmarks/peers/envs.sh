#!/usr/bin/env bash
# Creates the peers' own environments under runs/peers/ (each peer pins what it needs; none of this touches the
# vlmedge environment). Idempotent: an environment that imports is kept.
#   env-optimum: Hugging Face Optimum (optimum-onnx pins transformers < 4.58)
#   env-inc:     Intel Neural Compressor 3.x for PyTorch and its ONNX sibling (onnx-neural-compressor), plus vlmedge
#                itself: the harness runs here, because INC's PyTorch result is a compiled in-memory graph that can
#                only be timed in the process that made it (same torch, transformers and onnxruntime as vlmedge's).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=runs/peers
mkdir -p "$root"
make_env() {  # name, import check, packages...
  local name=$1 check=$2; shift 2
  local env=$root/$name
  if [[ -x $env/bin/python ]] && "$env/bin/python" -c "$check" 2>/dev/null; then return 0; fi
  rm -rf "$env"
  python3 -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip
  "$env/bin/pip" install -q torch==2.13.0          # the CPU build first: a free choice can pull CUDA wheels
  "$env/bin/pip" install -q "$@"
  "$env/bin/python" -c "$check"
}
make_env env-optimum "import optimum.onnxruntime" "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58" onnxruntime==1.32.0
make_env env-inc "import neural_compressor.torch, onnx_neural_compressor, PIL, yaml, rich, vlmedge" "neural-compressor-pt==3.10" \
  "onnx-neural-compressor==1.0" scipy "transformers>=5" onnxruntime==1.32.0 -e .  # scipy: an undeclared import of it
