"""Float ONNX for serving engines (ONNX Runtime, Triton's ONNX backend): `export --format=onnx`.

OUT is the Hugging Face directory `export` writes (config.json, tokenizer, ...) plus
OUT/model.onnx: the whole model (encoder, the run's pooling, head) with the calibration
temperature applied, so softmax (multi-label: sigmoid) of its `logits` output is predict's
probabilities. Inputs are named as the tokenizer's outputs (input_ids, attention_mask and,
where the family has them, token_type_ids), int64 with dynamic batch and sequence axes.
Long documents: the graph scores rows; pooling a document's windows is the caller's
(config.json window_pooling; modeling_flaxbert_cls.py `document_rows`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from typing import Any

from flaxbert_cls.decisions import tuning as decisions_lib
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import hf

log = logging.getLogger(__name__)

FORMATS = ("hf", "onnx")
ONNX_NAME = "model.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
_HINT = "pip install 'flaxbert-cls[quantize]' (and torch, CPU build)"


def check_format(export_format: str) -> None:
  if export_format not in FORMATS:
    raise UserError(f"--format={export_format}: unknown; use one of {list(FORMATS)}")


def _modules() -> tuple[Any, Any]:
  try:
    import onnx  # pylint: disable=g-import-not-at-top,unused-import  (torch.onnx needs it)
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"an ONNX export needs {e.name}, which is not installed: {_HINT}") from None
  return torch, transformers


def load_torch_model(hf_dir: str) -> Any:
  """The exported directory's PyTorch model; runs its modeling file only for our own
  mean-pooled exports (their config.json model_type), never another checkpoint's code."""
  _, transformers = _modules()
  with open(os.path.join(hf_dir, "config.json")) as f:
    ours = json.load(f).get("model_type", "").startswith(hf.MEAN_MODEL_TYPE_PREFIX)
  return transformers.AutoModelForSequenceClassification.from_pretrained(
      hf_dir, trust_remote_code=ours).eval()


def trace_to_onnx(model: Any, path: str, temperature: float = 1.0) -> list[str]:
  """Writes `model` (an HF sequence classifier) to `path`; returns its input names.

  The graph's `logits` are the model's divided by `temperature`.
  """
  torch, _ = _modules()
  # DistilBERT has no token types: the inputs its forward takes, in the tokenizer's order.
  names = [n for n in INPUT_NAMES if n in inspect.signature(model.forward).parameters]

  class Scored(torch.nn.Module):
    """Named inputs in, calibrated logits out: one traced graph."""

    def __init__(self):
      super().__init__()
      self.model = model

    def forward(self, *inputs):
      logits = self.model(**dict(zip(names, inputs))).logits
      return logits if temperature == 1.0 else logits / temperature

  dummy = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)
  axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tracer warnings about HF's shape checks
    # The TorchScript exporter (dynamo=False): one graph with dynamic batch and length.
    torch.onnx.export(Scored().eval(), dummy, path, input_names=names, output_names=["logits"],
                      dynamic_axes=axes, opset_version=OPSET, dynamo=False)
  return names


def write_float(hf_dir: str) -> str:
  """Writes hf_dir/model.onnx: the exported model with its calibration temperature applied."""
  model = load_torch_model(hf_dir)
  temperature = float(getattr(model.config, decisions_lib.HF_TEMPERATURE, None) or 1.0)
  path = os.path.join(hf_dir, ONNX_NAME)
  trace_to_onnx(model, path, temperature)
  log.info("float ONNX model: %s (%.1f MB, temperature %.4g applied)", path,
           os.path.getsize(path) / 1e6, temperature)
  return path
