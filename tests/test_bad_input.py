"""Bad input: one line on stderr naming what and where, exit status 2, checkpoints untouched."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from flaxbert_cls.training import runs
from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import UserError
from conftest import run_cli
from model_fixtures import DEMO_DATA, REPO, make_tiny_checkpoint

DEV = os.path.join(DEMO_DATA, "dev.tsv")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def train_args(workdir, checkpoint, **overrides):
  settings = dict(model_name_or_path=checkpoint, num_train_steps=2, batch_size=8,
                  eval_batch_size=8, max_seq_length=32, seq_buckets="(32,)",
                  train_file=DEV, validation_file=DEV, log_every_steps=1)
  settings.update(overrides)
  return ["train", f"--config={REPO}/configs/default.py", f"--workdir={workdir}",
          *[f"--config.{k}={v}" for k, v in settings.items()]]


def _tree_hash(directory) -> str:
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(path.encode())
      h.update(open(path, "rb").read())
  return h.hexdigest()


def _write(path, content: bytes | str) -> str:
  mode = "wb" if isinstance(content, bytes) else "w"
  with open(path, mode) as f:
    f.write(content)
  return str(path)


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, tmp_path_factory):
  """A workdir holding a finished run: every bad-input case below must leave it intact."""
  workdir = tmp_path_factory.mktemp("finished")
  code, _, err = run_cli(*train_args(workdir, tiny_checkpoint))
  assert code is None or code == 0, err
  return workdir


def _cases(tmp, checkpoint):
  """(case, config overrides or CLI args, a regex the one-line message must match)."""
  not_bert = tmp / "not_bert"
  not_bert.mkdir(exist_ok=True)
  _write(not_bert / "notes.txt", "hello")
  small_vocab = tmp / "small_vocab"
  shutil.copytree(checkpoint, small_vocab, dirs_exist_ok=True)
  config = json.load(open(small_vocab / "config.json"))
  _write(small_vocab / "config.json", json.dumps(dict(config, vocab_size=1000)))
  tsv = lambda name, text: _write(tmp / name, text)  # pylint: disable=unnecessary-lambda-assignment
  custom = dict(task_name="custom", text_columns="('text',)", label_column="label")
  return [
      ("missing file", dict(train_file=str(tmp / "absent.tsv")), r"absent.tsv: file not found"),
      ("empty file", dict(train_file=tsv("empty.tsv", "")), r"empty.tsv.*empty"),
      ("missing text column", dict(train_file=tsv("cols.tsv", "text\tlabel\nfine\t1\n")),
       r"cols.tsv.*'sentence'.*found.*\['text', 'label'\]"),
      ("unknown label", dict(train_file=tsv("lab.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")),
       r"lab.tsv line 3: label '7' is not one of"),
      ("empty text", dict(train_file=tsv("et.tsv", "sentence\tlabel\ngood\t1\n \t0\n")),
       r"et.tsv line 3.*empty"),
      ("non-UTF-8 bytes", dict(train_file=_write(tmp / "bytes.tsv",
                                                 b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")),
       r"bytes.tsv line 3.*UTF-8"),
      ("wrong field count", dict(train_file=tsv("fc.tsv", "sentence\tlabel\ngood\t1\nx\ty\t0\n")),
       r"fc.tsv line 3.*fields"),
      ("mixed label types", dict(custom, train_file=_write(
          tmp / "mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')),
       r"mixed.jsonl: label column mixes types: line 1 has number 1, line 2 has str 'pos'"),
      ("label_names disagree with data", dict(custom, label_names="('neg', 'pos')",
                                              train_file=_write(tmp / "l.jsonl",
                                                                '{"text": "a", "label": "ok"}\n')),
       r"l.jsonl line 1: label 'ok' is not one of \['neg', 'pos'\]"),
      ("not a BERT checkpoint", dict(model_name_or_path=str(not_bert)),
       r"not_bert: not a BERT checkpoint directory \(no config.json\)"),
      ("tokenizer/vocab mismatch", dict(model_name_or_path=str(small_vocab)),
       r"small_vocab: tokenizer has 30522 tokens but the model's vocab_size is 1000"),
      ("unknown config key", dict(learnin_rate=1e-3), r"unknown config key: learnin_rate"),
      ("zero batch size", dict(batch_size=0), r"config.batch_size=0: must be > 0"),
      ("negative learning rate", dict(learning_rate=-1.0), r"config.learning_rate=-1.0: must be"),
      ("zero steps", dict(num_train_steps=0, num_train_epochs=0.0),
       r"config.num_train_epochs=0.0: must be > 0"),
      ("batch not divisible by data shards", dict(batch_size=12),
       r"config.batch_size=12 is not divisible by the 8 data shards"),
      ("bad value type", dict(batch_size="abc"), r"--config.batch_size=abc"),
      ("unknown learning-rate schedule", dict(lr_schedule="step"),
       r"config.lr_schedule='step': use one of \('linear', 'cosine', 'constant'\)"),
      ("unknown CPU scheduler", dict(cpu_scheduler="fast"),
       r"config.cpu_scheduler='fast': use 'memory' or 'concurrency'"),
      ("float16 without loss scaling", dict(dtype="float16"),
       r"config.dtype='float16': float16 needs loss scaling.*use 'bfloat16'"),
      ("cuDNN attention in float32", dict(attention_impl="cudnn"),
       r"config.attention_impl='cudnn': cuDNN flash attention has no float32 kernel"),
      ("cuDNN attention without a GPU", dict(attention_impl="cudnn", dtype="bfloat16"),
       r"config.attention_impl='cudnn': needs a GPU, this run's devices are cpu"),
      ("unknown attention implementation", dict(attention_impl="flash"),
       r"config.attention_impl='flash': use '', 'xla', 'cudnn' or 'splash'"),
      ("splash attention with attention dropout", dict(attention_impl="splash"),
       r"config.attention_impl='splash': splash attention has no attention dropout; "
       r"set attention_dropout=0"),
      ("splash attention without a TPU", dict(attention_impl="splash", attention_dropout=0.0),
       r"config.attention_impl='splash': needs a TPU, this run's devices are cpu"),
  ]


def test_bad_input_table(finished_run, tiny_checkpoint, tmp_path):
  before = _tree_hash(finished_run / "checkpoints")
  report = []
  for name, overrides, pattern in _cases(tmp_path, tiny_checkpoint):
    code, _, err = run_cli(*train_args(finished_run, tiny_checkpoint, **overrides))
    lines = [l for l in err.splitlines() if l.startswith("flaxbert-cls:")]
    report.append(f"{name}: {lines[-1] if lines else err[-300:]}")
    assert code == 2, f"{name}: exit {code}: {err[-500:]}"
    assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err[-500:]}"
    assert __import__("re").search(pattern, lines[0]), f"{name}: {lines[0]}"
  print("\n".join(report))  # the table for the issue note (pytest -s)
  assert _tree_hash(finished_run / "checkpoints") == before


def test_unwritable_workdir(tiny_checkpoint, tmp_path):
  blocker = _write(tmp_path / "a_file", "x")
  code, _, err = run_cli(*train_args(os.path.join(blocker, "run"), tiny_checkpoint))
  assert code == 2 and "a_file/run: cannot create" in err


@contextlib.contextmanager
def _small_disk(path, size: str):
  """A real full disk: a tmpfs of `size` mounted at `path` (root only)."""
  path.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("needs root to mount a small tmpfs")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk) -> None:
  """Fills the disk to its last byte."""
  fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
  for size in (1 << 20, 1 << 12, 1):
    try:
      while True:
        os.write(fd, b"\0" * size)
    except OSError:
      pass
  os.close(fd)


def test_a_full_disk_keeps_a_file_being_replaced_or_appended_to(tmp_path):
  """workdir.write_text / append_line, with the disk full before the write: one line naming
  the file, and the file as it was."""
  with _small_disk(tmp_path / "disk", "1m") as disk:
    replaced, appended = disk / "predictions.jsonl", disk / "metrics.jsonl"
    replaced.write_text('{"old": 1}\n')
    appended.write_text('{"step": 1}\n')
    _fill(disk)
    with pytest.raises(UserError, match=r"predictions.jsonl: cannot write: no space left on "
                       r"device; its previous version is kept"):
      workdir_lib.write_text(str(replaced), '{"new": 2}\n' * 10_000)
    assert replaced.read_text() == '{"old": 1}\n'
    assert not (disk / "predictions.jsonl.partial").exists()
    with pytest.raises(UserError, match=r"metrics.jsonl: cannot write: no space left on device; "
                       r"its earlier lines are kept"):
      workdir_lib.append_line(str(appended), '{"step": 2, "x": "' + "y" * 100_000 + '"}')
    assert appended.read_text() == '{"step": 1}\n'


def test_disk_full_during_training_ends_in_one_line_and_keeps_the_checkpoints(
    tiny_checkpoint, tmp_path):
  """A tmpfs too small for the run: wherever the disk fills (a checkpoint, an eval file, a
  log), one line naming what could not be written, exit 2, the earlier checkpoints intact."""
  with _small_disk(tmp_path / "small_disk", "24m") as mount:
    workdir = mount / "run"
    code, _, err = run_cli(*train_args(workdir, tiny_checkpoint, checkpoint_every_steps=1,
                                    max_checkpoints_to_keep=5, keep_best_checkpoints=0,
                                    num_train_steps=6, cache_dir=str(tmp_path / "cache")))
    lines = [l for l in err.splitlines() if l.startswith("flaxbert-cls:")]
    assert code == 2, err[-800:]
    assert len(lines) == 1, err[-800:]
    assert ("cannot save checkpoint: no space left" in lines[0]
            or "cannot write: no space left on device" in lines[0]), lines[0]
    assert "Traceback" not in err, err[-800:]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps, "the checkpoints saved before the disk filled up are kept"
    import jax  # pylint: disable=g-import-not-at-top
    runs.load_run(str(workdir), step=steps[-1], devices=jax.devices()[:1])  # still restores
