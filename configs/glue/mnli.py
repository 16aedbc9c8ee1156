"""GLUE MNLI (accuracy on dev_matched) with bert-base-uncased; see flaxbert_cls.config.glue_config."""

from flaxbert_cls.config import glue_config


def get_config():
  return glue_config("mnli", eval_every_steps=5000)
