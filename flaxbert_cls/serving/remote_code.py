"""The modeling file an export carries, and the config.json keys that point transformers at it.

Every export gets `modeling_flaxbert_cls.py` (its `score_document` scores long documents
as predict does). A mean-pooled export's config.json also names the file's classes:

  model_type    flaxbert_cls_mean_<family>   (unknown to transformers: no silent [CLS] head)
  architectures ["MeanPooled<Family>ForSequenceClassification"]
  auto_map      AutoConfig / AutoModelForSequenceClassification -> those classes

so `AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`
builds transformers' own model with the mean-pooled head (docs/export.md).
An ensemble's export (a sweep's members averaged) names the file's FlaxbertEnsemble* classes
the same way: model_type flaxbert_cls_ensemble, one member's config.json as member_config.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from flaxbert_cls.data import tokenization
from flaxbert_cls.errors import UserError
from flaxbert_cls.model import hf
from flaxbert_cls.model import long_documents

MODELING_NAME = "modeling_flaxbert_cls.py"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_NAME)
POOLINGS = ("cls", "mean")
ENSEMBLE_CLASSES = ("FlaxbertEnsembleConfig", "FlaxbertEnsembleForSequenceClassification")
LAYOUTS = ("truncate", "head_tail", "windows")


def class_names(model_type: str) -> tuple[str, str]:
  """(config class, model class) of the mean-pooled `model_type` family in the modeling file."""
  architecture = hf.family(model_type).architecture  # BertForSequenceClassification
  stem = architecture.removesuffix("ForSequenceClassification")
  return f"MeanPooled{stem}Config", f"MeanPooled{architecture}"


def check_run_settings(config: Any, where: str) -> None:
  """The run's pooling and long-document keys are ones the export can reproduce (one line)."""
  pooling = config.pooling
  if pooling not in POOLINGS:
    raise UserError(f"{where}: config.pooling={pooling!r} cannot be exported; the export "
                    f"knows {list(POOLINGS)}")
  layout = config.long_document
  if layout not in LAYOUTS:
    raise UserError(f"{where}: config.long_document={layout!r} cannot be exported; the export "
                    f"knows {list(LAYOUTS)}")
  window_pooling = config.window_pooling
  if layout == "windows" and window_pooling not in long_documents.POOLINGS:
    raise UserError(f"{where}: config.window_pooling={window_pooling!r} cannot be exported; "
                    f"the export knows {list(long_documents.POOLINGS)}")


def run_fields(config: Any) -> dict[str, Any]:
  """config.json keys telling the modeling file how the run read its inputs."""
  fields = {"pooling": config.pooling,
            "max_seq_length": int(config.max_seq_length),
            "window_pooling": config.window_pooling}
  fields.update({k: config[k] for k in tokenization.LONG_DOCUMENT_KEYS})
  return fields


def write(directory: str, base_model_type: str, pooling: str, num_members: int = 0) -> None:
  """Copies the modeling file into `directory`; mean pooling: points its config.json at it;
  `num_members` > 0 (an ensemble's export): config.json becomes the ensemble's, holding one
  member's as member_config (the weights are members.<i>.<the member's names>)."""
  shutil.copyfile(_SOURCE, os.path.join(directory, MODELING_NAME))
  if pooling != "mean" and not num_members:
    return
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  module = MODELING_NAME.removesuffix(".py")
  if pooling == "mean":
    config_class, model_class = class_names(base_model_type)
    config["model_type"] = hf.mean_model_type(base_model_type)
    config["architectures"] = [model_class]
    config["auto_map"] = {"AutoConfig": f"{module}.{config_class}",
                          "AutoModelForSequenceClassification": f"{module}.{model_class}"}
  if num_members:
    # The labels, decisions and run keys stay at the top too: predict and score_document
    # read them there as from any export.
    config = {**config, "member_config": config, "num_members": num_members,
              "model_type": hf.ENSEMBLE_MODEL_TYPE, "architectures": [ENSEMBLE_CLASSES[1]],
              "auto_map": {"AutoConfig": f"{module}.{ENSEMBLE_CLASSES[0]}",
                           "AutoModelForSequenceClassification": f"{module}.{ENSEMBLE_CLASSES[1]}"}}
  with open(path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
