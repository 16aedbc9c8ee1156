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


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> str:
  """A directory holding the packaged MiniLM's tokenizer files alone."""
  from model_fixtures import minilm_dir  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), directory)
  return directory


@pytest.fixture
def ram_filesystem(monkeypatch):
  """TensorFlow's in-memory `ram://` file system as an etils.epath scheme (like gs://)."""
  tf = pytest.importorskip("tensorflow")
  from etils.epath import backend, gpath, register  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  return tf


def run_cli(*args: str) -> tuple[int, str, str]:
  """`flaxbert-cls ARGS` in this process as a user runs it (bad input: one line, exit 2):
  (exit status, stdout, stderr)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import cli  # pylint: disable=g-import-not-at-top
  out, err = io.StringIO(), io.StringIO()
  sys.argv = ["flaxbert-cls", *args]
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
      pytest.raises(SystemExit) as exit_info:
    cli.run()
  return exit_info.value.code or 0, out.getvalue(), err.getvalue()


def call_cli(*args: str) -> None:
  """`flaxbert-cls ARGS` in this process, exceptions raised as they are (absl flags are
  global: reset first)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flaxbert_cls import cli  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  cli._main(flags.FLAGS(["flaxbert-cls", *args]))  # pylint: disable=protected-access


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (coordinators, MLflow servers)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
