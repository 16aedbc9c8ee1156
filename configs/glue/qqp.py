"""GLUE QQP (accuracy / F1) with bert-base-uncased; see flaxbert_cls.config.glue_config."""

from flaxbert_cls.config import glue_config


def get_config():
  return glue_config("qqp", eval_every_steps=5000)
