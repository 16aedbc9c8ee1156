"""flaxbert-cls: fine-tune BERT-family encoders for text classification with JAX/Flax."""

from flaxbert_cls import moved as _moved

__version__ = "0.1.0"

_moved.install()  # flaxbert_cls.train, .hf, ... of 0.1: aliases of the layer folders' modules


def __getattr__(name: str):
  """`from flaxbert_cls import hf` (an old flat module) after `import flaxbert_cls`."""
  if name in _moved.OLD_TO_NEW and name not in _moved.FOLDERS:
    return _moved.load(name)
  raise AttributeError(f"module 'flaxbert_cls' has no attribute {name!r}")
