"""predict on a pod: 2 real processes on 127.0.0.1 write parts that equal one process's output.

The 2-process scenarios run the CLI (`flaxbert-cls predict --output=DIR
--coordinator_address=... --num_processes=2 --process_id=i`); the refusals, shards and a
remote output run in this process. The model is a tiny random BERT classifier saved as a
Hugging Face directory (no training). Probabilities are compared with a tolerance: a part
forms its own length-sorted batches, padded to other lengths than the whole file's.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from flaxbert_cls.data import byte_ranges
from flaxbert_cls.errors import UserError
from flaxbert_cls.serving import pod_predict
from flaxbert_cls.serving import predict
from model_fixtures import DEMO_DATA, REPO, minilm_dir
from conftest import free_port

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

DEADLINE_S = 200  # per 2-process run; a healthy one takes ~20 s
ROWS = 160

# The CLI unchanged; POD_TEST_STALL_PROCESS=i makes process i stop after its second chunk
# (as if preempted there), so the test can kill the run while that process is mid-part.
WORKER = textwrap.dedent("""
    import os, time
    import jax
    from flaxbert_cls import cli
    from flaxbert_cls.serving import pod_predict
    stall = os.environ.get("POD_TEST_STALL_PROCESS")
    if stall is not None:
      save = pod_predict._PartWriter._save_progress
      def stalling_save(self, chunks):
        save(self, chunks)
        while jax.process_index() == int(stall) and len(chunks) >= 2:
          time.sleep(1)  # until the test kills it
      pod_predict._PartWriter._save_progress = stalling_save
    cli.run()
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pod_predict")
  model = str(tmp / "classifier")
  config = transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, num_labels=2,
      id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).save_pretrained(model)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir(), name), model)
  lines = open(os.path.join(DEMO_DATA, "dev.tsv")).read().splitlines()[1:ROWS + 1]
  sentences = [line.split("\t")[0] for line in lines]
  input_path = tmp / "input.jsonl"
  input_path.write_text("".join(json.dumps({"id": i, "sentence": s}) + "\n"
                                for i, s in enumerate(sentences)))
  (tmp / "worker.py").write_text(WORKER)
  predictor = predict.Predictor.from_path(model)
  return {"tmp": tmp, "model": model, "input": str(input_path), "sentences": sentences,
          "expected": predictor.predict(sentences)}


def _rows(output_dir, count=2):
  rows = []
  for i in range(count):
    with open(os.path.join(output_dir, f"part-{i:05d}-of-{count:05d}.jsonl")) as f:
      rows += [json.loads(line) for line in f]
  return rows


def _assert_matches(rows, setup):
  """Row for row: the same texts in input order and labels; probabilities to float error."""
  assert [r["sentence"] for r in rows] == setup["sentences"]
  assert [r["label"] for r in rows] == [r["label"] for r in setup["expected"]]
  np.testing.assert_allclose([r["probabilities"]["pos"] for r in rows],
                             [r["probabilities"]["pos"] for r in setup["expected"]],
                             atol=1e-5, rtol=0)


def _start(setup, output_dir, name, stall_process=None, chunk_rows=20):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAXBERT_", "POD_TEST_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO)
  if stall_process is not None:
    env["POD_TEST_STALL_PROCESS"] = str(stall_process)
  port, procs = free_port(), []
  for i in range(2):
    log = str(setup["tmp"] / f"{name}.log.{i}")
    procs.append((subprocess.Popen(
        [sys.executable, str(setup["tmp"] / "worker.py"), "predict", f"--model={setup['model']}",
         f"--input={setup['input']}", f"--output={output_dir}", f"--chunk_rows={chunk_rows}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True), log))
  return procs, time.monotonic() + DEADLINE_S


def _kill(procs):
  for p, _ in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _finish(run):
  procs, deadline = run
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    _kill(procs)
    pytest.fail("2-process predict did not finish in time (hang?):\n" +
                "\n-----\n".join(open(log).read()[-3000:] for _, log in procs))
  logs = [open(log).read() for _, log in procs]
  for i, (p, _) in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{logs[i][-4000:]}"
  return logs


def test_two_processes_killed_and_rerun_write_two_parts_equal_to_one_process(setup):
  """Killed while process 1 is mid-part; its second chunk damaged; the rerun keeps process 0's
  part, redoes the damaged chunk and the rest, and the two parts are the one-process output."""
  output_dir = str(setup["tmp"] / "resumed")
  run = _start(setup, output_dir, "killed", stall_process=1)
  procs, deadline = run
  part0 = os.path.join(output_dir, "part-00000-of-00002.jsonl")
  progress = os.path.join(output_dir, "_temporary", "part-00001-of-00002.jsonl", "progress.json")

  def chunks_written():
    try:
      return len(json.load(open(progress))["chunks"])
    except (OSError, ValueError):
      return 0

  while not (os.path.exists(part0) and chunks_written() >= 2):
    if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
      _kill(procs)
      pytest.fail("\n-----\n".join(open(log).read()[-3000:] for _, log in procs))
    time.sleep(0.05)
  _kill(procs)  # process 1 mid-part (its part not renamed), process 0 done with its part
  assert not os.path.exists(os.path.join(output_dir, "part-00001-of-00002.jsonl"))
  written = json.load(open(progress))["chunks"]
  assert len(written) == 2
  finished_at = os.stat(part0).st_mtime_ns
  # Damage process 1's second chunk: it and every chunk after it are redone.
  damaged = os.path.join(os.path.dirname(progress), written[1]["file"])
  with open(damaged, "r+b") as f:
    f.truncate(7)

  logs = _finish(_start(setup, output_dir, "rerun"))
  assert "part-00000-of-00002.jsonl is complete" in logs[0] and "skipped" in logs[0]
  assert os.stat(part0).st_mtime_ns == finished_at  # not rewritten
  assert f"{written[1]['file']} is damaged (7 of {written[1]['bytes']} bytes)" in logs[1]
  assert f"resuming after 1 intact chunks ({written[0]['rows']} rows" in logs[1]
  assert sorted(n for n in os.listdir(output_dir) if n.startswith("part-")) == [
      "part-00000-of-00002.jsonl", "part-00001-of-00002.jsonl"]
  _assert_matches(_rows(output_dir), setup)
  assert not os.path.exists(os.path.join(output_dir, "_temporary", "part-00001-of-00002.jsonl"))
  success = json.load(open(os.path.join(output_dir, "_SUCCESS")))
  parts = success["parts"]
  assert success["rows"] == sum(p["rows"] for p in parts) == ROWS
  assert success["rows_this_run"] == parts[1]["rows"] - written[0]["rows"]
  size = os.path.getsize(setup["input"])
  for part in parts:  # line-aligned halves: each process read about half the bytes
    assert 0.45 * size <= part["input"]["stop"] - part["input"]["start"] <= 0.55 * size
  assert [p["process"] for p in success["processes"]] == [0, 1]
  assert [p["rows"] for p in success["processes"]] == [0, success["rows_this_run"]]
  assert success["processes"][1]["rows_per_sec"] > 0 and success["rows_per_sec"] > 0
  assert success["inputs"][0]["size"] == size
  for i, text in enumerate(logs):
    assert f"predicted: process {i}:" in text and f"{ROWS} rows in 2 parts" in text


def test_refuses_another_input_a_changed_input_and_a_split_csv(setup, tmp_path):
  output_dir = str(tmp_path / "out")
  first = tmp_path / "first.jsonl"
  shutil.copy(setup["input"], first)
  stats = pod_predict.predict_parts(setup["model"], str(first), output_dir, chunk_rows=64)
  assert stats["rows"] == ROWS and stats["process"]["rows"] == ROWS
  _assert_matches(_rows(output_dir, 1), setup)
  again = pod_predict.predict_parts(setup["model"], str(first), output_dir)  # all complete
  assert again["rows"] == ROWS and again["rows_this_run"] == 0
  with pytest.raises(UserError, match=r"out: its parts were written with predicted_with="
                                      r"\{'model': .*classifier'.*, this run has"):
    pod_predict.predict_parts(str(tmp_path / "another_model"), str(first), output_dir)
  other = tmp_path / "other.jsonl"
  other.write_text('{"sentence": "fine"}\n')
  with pytest.raises(UserError, match=r"out: holds the parts of another input \(.*first.jsonl\), "
                                      r"not of .*other.jsonl; give a new --output"):
    pod_predict.predict_parts(setup["model"], str(other), output_dir)
  with open(first, "a") as f:
    f.write('{"sentence": "one more row"}\n')
  with pytest.raises(UserError, match=r"first.jsonl: changed since .*out's parts were written "
                                      r"\(size \d+ -> \d+ bytes"):
    pod_predict.predict_parts(setup["model"], str(first), output_dir)
  with pytest.raises(UserError, match="--output_format=txt"):
    pod_predict.predict_parts(setup["model"], str(first), str(tmp_path / "x"), "txt")
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "part-00000-of-00001.jsonl").write_text("{}\n")
  with pytest.raises(UserError, match=r"stray: holds part files but no _manifest.json"):
    pod_predict.predict_parts(setup["model"], str(first), str(stray))
  header_only = tmp_path / "header.tsv"
  header_only.write_text("sentence\tlabel\n")
  with pytest.raises(UserError, match=r"header.tsv: no data rows"):
    pod_predict.predict_parts(setup["model"], str(header_only), str(tmp_path / "none"))
  csv_path = tmp_path / "texts.csv"
  csv_path.write_text('sentence\n"two\nlines"\nplain\n')
  with pytest.raises(UserError, match=r"texts.csv: a CSV file cannot be split into 2 byte ranges"):
    byte_ranges.split_file(str(csv_path), 2)
  with pytest.raises(UserError, match=r"shards are predicted into a directory of parts"):
    pod_predict.wants_parts(str(tmp_path / "part-*.jsonl"), "out.jsonl")
  assert not pod_predict.wants_parts(str(first), "out.jsonl")
  assert pod_predict.wants_parts(str(first), "gs://bucket/predictions/")


def test_shards_are_parts_and_byte_ranges_read_the_file_lines(setup, tmp_path):
  lines = open(setup["input"]).read().splitlines(keepends=True)
  shards = tmp_path / "shards"
  shards.mkdir()
  for i, (a, b) in enumerate(((0, 50), (50, 51), (51, ROWS))):
    (shards / f"part-{i}.jsonl").write_text("".join(lines[a:b]))
  output_dir = str(tmp_path / "sharded")
  stats = pod_predict.predict_parts(setup["model"], str(shards / "part-*.jsonl"), output_dir,
                                    "csv", chunk_rows=32)
  assert [p["rows"] for p in stats["parts"]] == [50, 1, ROWS - 51]
  import csv  # pylint: disable=g-import-not-at-top
  rows = []
  for i in range(3):
    with open(os.path.join(output_dir, f"part-{i:05d}-of-00003.csv"), newline="") as f:
      rows += list(csv.DictReader(f))  # every part has its header
  assert [r["sentence"] for r in rows] == setup["sentences"]
  np.testing.assert_allclose([float(r["p_pos"]) for r in rows],
                             [r["probabilities"]["pos"] for r in setup["expected"]], atol=1e-5)
  # Byte ranges name the file's line in errors, whichever range holds it.
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(lines[:100]) + '{"text": "no sentence"}\n' + "".join(lines[100:]))
  task = predict.Predictor.from_path(setup["model"]).task
  ranges = byte_ranges.split_file(str(bad), 3)
  data = bad.read_bytes()
  assert ranges[0].start == 0 and ranges[-1].stop == len(data)
  assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
  assert all(data[r.start - 1:r.start] == b"\n" for r in ranges[1:])  # each starts a line
  assert data.count(b"\n", 0, ranges[1].start) < 100 < data.count(b"\n", 0, ranges[2].start)
  with pytest.raises(UserError, match=r"bad.jsonl line 101: no key 'sentence'"):
    for r in ranges:
      for _ in byte_ranges.read_range_chunks(r, task, 16):
        pass


def test_remote_input_and_output(setup, ram_filesystem):
  tf = ram_filesystem
  tf.io.gfile.makedirs("ram://pod/in")
  tf.io.gfile.copy(setup["input"], "ram://pod/in/input.jsonl", overwrite=True)
  stats = pod_predict.predict_parts(setup["model"], "ram://pod/in/input.jsonl", "ram://pod/out",
                                    chunk_rows=64)
  assert stats["rows"] == ROWS
  with tf.io.gfile.GFile("ram://pod/out/part-00000-of-00001.jsonl") as f:
    _assert_matches([json.loads(line) for line in f], setup)
  assert tf.io.gfile.exists("ram://pod/out/_SUCCESS")


def test_byte_ranges_read_what_the_stream_reads(tmp_path):
  """Any number of ranges (more than lines too), any resume point: the whole file's rows."""
  from flaxbert_cls.data import streaming  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.data import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.Task(name="t", text_fields=("sentence",), label_field="\x00none", label_names=None)
  tsv = os.path.join(DEMO_DATA, "dev.tsv")  # a header, 872 rows
  csv_path = tmp_path / "quoted.csv"
  csv_path.write_bytes(b'\xef\xbb\xbfsentence,label\n"two\nlines",1\nplain,0\n"a ""b""",1\n')
  for path, counts in ((tsv, (1, 3, 7, 2000)), (str(csv_path), (1,))):
    whole = [t for c in streaming.read_file_chunks(path, task, 100) for t in c.texts]
    for parts in counts:
      ranges = byte_ranges.split_file(path, parts)
      read = [t for r in ranges for c in byte_ranges.read_range_chunks(r, task, 37)
              for t in c.examples.texts]
      assert read == whole, (path, parts)
    chunks = list(byte_ranges.read_range_chunks(byte_ranges.split_file(path, 1)[0], task, 2))
    resumed = byte_ranges.read_range_chunks(byte_ranges.split_file(path, 1)[0], task, 2,
                                            start=chunks[0].stop)
    assert [t for c in resumed for t in c.examples.texts] == whole[2:]
  assert whole == [("two\nlines",), ("plain",), ('a "b"',)]
