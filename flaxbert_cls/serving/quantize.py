"""int8 CPU serving: ONNX Runtime dynamic quantization of an exported model.

  flaxbert-cls export --workdir=DIR --output=OUT --quantize=int8   (adds OUT/model.int8.onnx)
  flaxbert-cls predict --model=OUT --quantize=int8 --input=... --output=...

Writing the artifact exports the Hugging Face directory's PyTorch model to ONNX
(`torch.onnx.export`) and quantizes every MatMul weight to int8, per output channel
(`onnxruntime.quantization.quantize_dynamic`; activations are quantized on the fly).
Serving needs only onnxruntime. The route was chosen by measurement (docs/design.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np

from flaxbert_cls.model import long_documents
from flaxbert_cls.errors import UserError
from flaxbert_cls.serving import onnx_export

log = logging.getLogger(__name__)

MODES = ("int8",)
INT8_NAME = "model.int8.onnx"  # beside model.safetensors in an exported directory
_EXTRA_HINT = "pip install 'flaxbert-cls[quantize]'"


def check_mode(mode: str | None) -> None:
  if mode and mode not in MODES:
    raise UserError(f"--quantize={mode}: unknown; use one of {list(MODES)}")


def require_onnxruntime() -> Any:
  """The onnxruntime module, or one line saying how to install it."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"--quantize=int8 needs onnxruntime, which is not installed: {_EXTRA_HINT}"
                    ) from None
  return onnxruntime


def write_int8(hf_dir: str, output_path: str | None = None) -> str:
  """Writes the int8 ONNX model of the HF directory `hf_dir` (default: hf_dir/model.int8.onnx)."""
  require_onnxruntime()
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=g-import-not-at-top
  output_path = output_path or os.path.join(hf_dir, INT8_NAME)
  model = onnx_export.load_torch_model(hf_dir)  # mean-pooled exports: their modeling file
  with tempfile.TemporaryDirectory() as tmp:
    float_path = os.path.join(tmp, "model.onnx")
    onnx_export.trace_to_onnx(model, float_path)  # raw logits: predict applies the temperature
    # MatMul weights only, per channel, 7-bit range: see docs/design.md for the numbers.
    quantize_dynamic(float_path, output_path, weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True, op_types_to_quantize=["MatMul"])
  log.info("int8 model: %s (%.1f MB)", output_path, os.path.getsize(output_path) / 1e6)
  return output_path


class OnnxClassifier:
  """An ONNX Runtime session called as `evaluate.gather_logits` calls the jitted eval step."""

  def __init__(self, path: str):
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    # Idle threads sleep instead of spinning: on a shared or busy CPU spinning steals the
    # cores the working threads need (70 vs 50 examples/s on this project's 2-core VM).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
      self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  (ORT raises its own types)
      raise UserError(f"{path}: not a loadable ONNX model: {' '.join(str(e).split())[:200]}"
                      ) from None
    self.path = path
    self.input_names = [i.name for i in self.session.get_inputs()]

  # Window batches (long_document='windows'): how a document's window logits are pooled.
  window_pooling: str = "mean"

  def __call__(self, params: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    del params  # the weights are in the session
    ids = np.asarray(batch["input_ids"])
    if ids.ndim == 2:
      return self._run(batch)
    docs, windows = ids.shape[:2]
    rows = {n: np.asarray(batch[n]).reshape(docs * windows, -1) for n in self.input_names}
    logits = self._run(rows).reshape(docs, windows, -1)
    return np.asarray(long_documents.pool_windows(logits, np.asarray(batch["window_mask"]),
                                                  self.window_pooling), np.float32)

  def _run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of the rows with tokens; the batch's filler rows (no token) get zeros.

    A filler row never reaches the graph: a mean-pooled row of no tokens is 0/0 in
    transformers' ModernBERT, and int8's per-tensor activation scales would carry that NaN
    into every row of the batch.
    """
    feed = {n: np.asarray(batch[n], np.int64) for n in self.input_names}
    real = np.asarray(batch["attention_mask"]).any(-1)
    if not real.any():
      real[0] = True  # one row still runs: the graph's output gives the logits' width
    logits = self.session.run(None, {n: x[real] for n, x in feed.items()})[0]
    out = np.zeros((len(real), logits.shape[-1]), np.float32)
    out[real] = logits
    return out
