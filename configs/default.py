"""Defaults for every key (see flaxbert_cls/config.py for what each key means)."""

from flaxbert_cls.config import default_config


def get_config():
  return default_config()
