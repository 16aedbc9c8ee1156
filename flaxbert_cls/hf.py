"""Hugging Face checkpoints in and out: resolve, config, safetensors, name map, tokenizer.

All knowledge of HF names lives here. Flax paths mirror PyTorch names, so the
map is mechanical: join the path with '.', and rename the leaf
(kernel -> weight, transposed; embedding -> weight; scale -> weight).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
# Files fetched from the hub: config, weights, tokenizer. Never code.
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                 "vocab.txt", "merges.txt", "vocab.json", "special_tokens_map.json"]
# Checkpoints older than transformers 4 name LayerNorm parameters gamma/beta.
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}
# Leaves in PyTorch checkpoints that are buffers, not parameters.
_BUFFERS = ("position_ids", "token_type_ids")


def resolve(name_or_path: str) -> str:
  """Returns a local directory for a checkpoint directory or a hub id."""
  if os.path.isdir(name_or_path):
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
      raise UserError(f"{name_or_path}: not a BERT checkpoint directory (no config.json)")
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
    raise UserError(f"{name_or_path}: checkpoint directory not found")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(name_or_path, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # pylint: disable=broad-except
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else str(e).splitlines()[0]
    raise UserError(f"model_name_or_path={name_or_path!r}: no such local directory, and the hub "
                    f"download failed: {why}") from None


def load_config(checkpoint_dir: str) -> Any:
  """The checkpoint's transformers config (AutoConfig; no remote code)."""
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    return transformers.AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{checkpoint_dir}/config.json: cannot read config: "
                    f"{str(e).splitlines()[0]}") from None


def load_tokenizer(checkpoint_dir: str, vocab_size: int | None = None) -> Any:
  """The fast tokenizer saved with the checkpoint; checks it fits the model's vocab."""
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir, use_fast=True,
                                                           trust_remote_code=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"{checkpoint_dir}: cannot load a tokenizer: {str(e).splitlines()[0]}") from None
  if vocab_size is not None and len(tokenizer) > vocab_size:
    raise UserError(f"{checkpoint_dir}: tokenizer has {len(tokenizer)} tokens but the model's "
                    f"vocab_size is {vocab_size}; they do not belong together")
  return tokenizer


def load_state_dict(checkpoint_dir: str) -> dict[str, np.ndarray]:
  """Reads weights as NumPy: safetensors first; pytorch_model.bin only with torch."""
  path = os.path.join(checkpoint_dir, SAFETENSORS_NAME)
  if os.path.isfile(path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{path}: unreadable safetensors file: {str(e).splitlines()[0]}") from None
  path = os.path.join(checkpoint_dir, PYTORCH_NAME)
  if os.path.isfile(path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(f"{path}: a PyTorch pickle; install torch to read it (or convert the "
                      f"checkpoint to {SAFETENSORS_NAME})") from None
    # weights_only: never unpickle arbitrary objects from a checkpoint.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
  raise UserError(f"{checkpoint_dir}: no {SAFETENSORS_NAME} or {PYTORCH_NAME}")


def _torch_key(path: tuple[str, ...]) -> str:
  *parents, leaf = path
  leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join((*parents, leaf))


def _normalize_torch_keys(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Adds the model prefix if the checkpoint is a bare encoder, renames legacy leaves."""
  bare = not any(k.startswith(prefix + ".") for k in state)
  out = {}
  for key, value in state.items():
    parent, _, leaf = key.rpartition(".")
    if "LayerNorm" in parent and leaf in _LEGACY_LEAVES:
      key = f"{parent}.{_LEGACY_LEAVES[leaf]}"
    if bare and not key.startswith(("classifier.", "cls.")):
      key = f"{prefix}.{key}"
    out[key] = value
  return out


def params_from_state_dict(state: Mapping[str, np.ndarray], target: Mapping[str, Any],
                           prefix: str = "bert") -> tuple[dict[str, Any], list[str], list[str]]:
  """Fills `target` (a Flax params tree or its shapes) from a PyTorch-named state dict.

  Returns (params, new: flax paths not in the checkpoint, unused: checkpoint keys
  not used). Shapes are checked; a mismatch is an error naming the key.
  """
  state = _normalize_torch_keys(state, prefix)
  flat = traverse_util.flatten_dict(dict(target))
  params, new = {}, []
  used = set()
  for path, leaf in flat.items():
    key = _torch_key(path)
    if key not in state:
      new.append("/".join(path))
      params[path] = leaf
      continue
    value = np.asarray(state[key], dtype=np.float32)
    if path[-1] == "kernel":
      value = value.T
    if tuple(value.shape) != tuple(leaf.shape):
      raise UserError(f"checkpoint key {key}: shape {value.shape} does not fit the model's "
                      f"{tuple(leaf.shape)} ({'/'.join(path)})")
    params[path] = value
    used.add(key)
  unused = sorted(k for k in state if k not in used and k.rpartition(".")[2] not in _BUFFERS)
  return traverse_util.unflatten_dict(params), new, unused


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse map: Flax params -> PyTorch-named float32 NumPy arrays (for export)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value, dtype=np.float32)
    out[_torch_key(path)] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  return out
