"""Shared pytest setup: environment first, then fixtures."""

import os

# Before anything imports jax / datasets: 8 fake CPU devices for sharding
# tests, and no network access to the Hugging Face Hub.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# libtpu (the [tpu] extra, for test_plan.py's TPU compiles) on a host without a TPU: no
# metadata-server queries, and no per-process lock against other test processes.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session")
def glue_dir() -> str:
  """$FLAXBERT_DATA/glue (holding SST-2/, CoLA/, MRPC/, RTE/)."""
  path = os.path.join(os.environ.get("FLAXBERT_DATA", ""), "glue")
  if not os.environ.get("FLAXBERT_DATA") or not os.path.isdir(path):
    message = ("GLUE data not found: set FLAXBERT_DATA=... (the directory "
               f"holding glue/SST-2/train.tsv); looked in {path!r}")
    if os.environ.get("FLAXBERT_REQUIRE_DATA") == "1":
      pytest.fail(message)
    pytest.skip(message)
  return path
