"""GLUE WNLI (accuracy) with bert-base-uncased; see flaxbert_cls.config.glue_config."""

from flaxbert_cls.config import glue_config


def get_config():
  return glue_config("wnli", num_train_epochs=5.0)
