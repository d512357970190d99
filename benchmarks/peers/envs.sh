#!/usr/bin/env bash
# Creates the peers' own environments under runs/peers/ (each peer pins what it needs; none of this touches the
# vlmedge environment). Idempotent: an environment that imports is kept.
#   env-optimum: Hugging Face Optimum (optimum-onnx pins transformers < 4.58)
#   env-inc:     Intel Neural Compressor 3.x for PyTorch and its ONNX sibling (onnx-neural-compressor), plus vlmedge
#                itself: the harness runs here, because INC's PyTorch result is a compiled in-memory graph that can
#                only be timed in the process that made it (same torch, transformers and onnxruntime as vlmedge's).
#   env-openvino: OpenVINO through optimum-intel, for the SmolVLM-256M comparison; transformers < 4.58 because
#                optimum-intel 2.2 refuses to export SmolVLM with 5.x ("Maximum required is 4.57.6"), datasets < 5
#                because 5.x needs a huggingface-hub that transformers 4.57 does not accept
#   llama.cpp:   llama-mtmd-cli and llama-quantize built for this CPU from the llama-cpp-python sdist's vendored
#                llama.cpp (PyPI is reachable where GitHub is not), and a venv with its gguf-py for the converter
#   genai:       onnxruntime-genai's model builder (genai_decoder.py), installed without its dependencies into a
#                folder of its own: it runs on vlmedge's torch, transformers and onnxruntime
# Usage: envs.sh [env-optimum env-inc env-openvino llama.cpp genai]   (no argument: all of them)
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
LLAMA_CPP_PYTHON=0.3.36  # its vendored llama.cpp has tools/mtmd (libmtmd) and convert_hf_to_gguf.py with --mmproj
make_llama_cpp() {
  local src=$root/dl/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp build=$root/llama-build
  mkdir -p "$root/dl"
  if [[ ! -d $src ]]; then
    pip download -q --no-deps --no-binary :all: -d "$root/dl" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar xzf "$root/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$root/dl"
  fi
  if [[ ! -x $build/bin/llama-mtmd-cli || ! -x $build/bin/llama-quantize ]]; then
    cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
    ninja -C "$build" llama-mtmd-cli llama-quantize
  fi
  make_env env-gguf "import gguf, transformers, safetensors" "transformers>=5" sentencepiece safetensors numpy \
    "$src/gguf-py"  # the converter's environment
}
want() { [[ ${#ALL[@]} -eq 0 ]] || [[ " ${ALL[*]} " == *" $1 "* ]]; }
ALL=("$@")
if want env-optimum; then
  make_env env-optimum "import optimum.onnxruntime" "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58" onnxruntime==1.32.0
fi
if want env-inc; then
  make_env env-inc "import neural_compressor.torch, onnx_neural_compressor, PIL, yaml, rich, vlmedge" "neural-compressor-pt==3.10" \
    "onnx-neural-compressor==1.0" scipy "transformers>=5" onnxruntime==1.32.0 -e .  # scipy: an undeclared import of it
fi
if want env-openvino; then
  make_env env-openvino "import optimum.intel.openvino, openvino, nncf, PIL, datasets" "optimum-intel[openvino]" pillow "datasets<5" "transformers<4.58"
fi
if want llama.cpp; then make_llama_cpp; fi
if want genai && [[ ! -f $root/genai/onnxruntime_genai/models/builder.py ]]; then
  pip install -q --no-deps --target "$root/genai" onnxruntime-genai==0.18.0
fi
