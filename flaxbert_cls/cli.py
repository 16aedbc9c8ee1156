"""`flaxbert-cls train|eval|report|export|predict|monitor`: parse flags, then call one function.

  flaxbert-cls train --config=configs/sst2.py --workdir=DIR [--config.learning_rate=3e-5]
  flaxbert-cls eval --workdir=DIR [--config=... --config.validation_file=...] [--step=N]
      [--member=best|I|mean]   (mean: a sweep's members averaged, an ensemble)
  flaxbert-cls report --workdir=DIR   (writes DIR/report/index.html)
  flaxbert-cls export --workdir=DIR --output=HF_DIR [--step=latest|best|N] [--quantize=int8]
      [--member=best|I|mean] [--format=hf|onnx]
  flaxbert-cls predict --model=DIR_OR_HF_DIR --input=FILE.{tsv,csv,jsonl} --output=FILE.{csv,jsonl}
      [--quantize=int8] [--batch_size=N] [--step=...] [--member=best|I|mean]
  flaxbert-cls predict --model=... --input=FILE_OR_'part-*.jsonl' --output=DIR [--output_format=csv]
      [--coordinator_address=... --num_processes=N --process_id=I]   (parts; pod_predict.py)
  flaxbert-cls monitor --model=DIR_OR_HF_DIR --reference=FILE --current=FILE [--output=DIR]
      (exit status 0: stable, 3: drift)
  flaxbert-cls plan --config=... --topology=v5e:4x4|host [--num_slices=N] [--json=FILE]
      [--largest_only] [--save_compiled=DIR] | plan --list   (compiles for a TPU topology on any host; exit 3:
      a program does not fit)
  flaxbert-cls track --workdir=DIR [--report_to=mlflow] [--output=EXPORTED_DIR]
      (uploads a finished or interrupted run to its experiment trackers, idempotently)
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flaxbert_cls import workdir as workdir_lib
from flaxbert_cls.errors import PREEMPTED_EXIT_CODE, Preempted, UserError

COMMANDS = ("train", "eval", "report", "export", "predict", "monitor", "plan", "track")

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_STEP = flags.DEFINE_string("step", None,
                            "eval/export/predict: checkpoint step: latest (default), best or N.")
_OUTPUT = flags.DEFINE_string("output", None, "export: new HF model directory; predict: "
                              "results file (.csv or .jsonl) or a directory of parts; monitor: "
                              "report directory.")
_MODEL = flags.DEFINE_string("model", None, "predict, monitor: a workdir or an exported HF "
                             "directory.")
_MEMBER = flags.DEFINE_string("member", None, "eval/export/predict of a sweep's workdir: "
                              "which member, best (default), its index, or mean (every member's probabilities "
                              "averaged: an ensemble; export/predict of it after eval fits its thresholds).")
_INPUT = flags.DEFINE_string("input", None, "predict: texts to classify (.tsv, .csv, .jsonl).")
_TEXT_COLUMNS = flags.DEFINE_list("text_columns", None,
                                  "predict: input columns holding the text (default: the run's).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"],
                              "export: also write model.int8.onnx; predict: predict with the "
                              "int8 ONNX Runtime model (needs the [quantize] extra).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "onnx"],
                            "export: 'onnx' also writes OUT/model.onnx (float, the calibration "
                            "temperature applied) beside the HF directory's files.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "predict: examples per batch (default: the run's "
                                   "eval_batch_size, or 64).")
# predict into a directory of parts, on one process or every process of a pod (pod_predict.py).
_OUTPUT_FORMAT = flags.DEFINE_enum("output_format", "jsonl", ["jsonl", "csv"],
                                   "predict --output=DIR: the parts' format.")
_CHUNK_ROWS = flags.DEFINE_integer("chunk_rows", None, "predict: rows read, predicted and "
                                   "written at a time (a rerun into DIR resumes at a chunk).")
# monitor (drift between two data sets, monitor.py).
_REFERENCE = flags.DEFINE_string("reference", None, "monitor: the reference data set (a file "
                                 "like predict's --input, e.g. the training or dev data).")
_CURRENT = flags.DEFINE_string("current", None, "monitor: the data set to compare with it.")
_PSI_THRESHOLD = flags.DEFINE_float("psi_threshold", 0.2, "monitor: a feature drifts when its "
                                    "population stability index is above this ...")
_P_VALUE = flags.DEFINE_float("p_value", 0.01, "monitor: ... and its two-sample test's p-value "
                              "is below this.")
_LABEL_COLUMN = flags.DEFINE_string("label_column", None, "monitor: gold labels in both files "
                                    "(adds each set's metrics to the report).")
# plan (compile for a TPU topology without one: plan/plan.py).
_TOPOLOGY = flags.DEFINE_string("topology", None, "plan: TPU topology, e.g. v5e:4x4, v4:2x2x1 "
                                "(plan --list), or GPUs, e.g. h100:8 (jax's CUDA plugin).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "plan: slices of that topology (multi-slice).")
_JSON = flags.DEFINE_string("json", None, "plan: also write every figure to this JSON file.")
_LIST = flags.DEFINE_bool("list", False, "plan: list the topology names this libtpu accepts.")
_SAVE_COMPILED = flags.DEFINE_string("save_compiled", None, "plan: also save every compiled "
                                     "program in this folder, for a run's "
                                     "--config.compiled_programs.")
_LARGEST_ONLY = flags.DEFINE_bool("largest_only", False, "plan: compile the longest sequence "
                                  "bucket only (the peak memory), not every bucket.")
_REPORT_TO = flags.DEFINE_list("report_to", None, "track: the trackers to upload to (default: "
                               "the run's config.report_to), e.g. mlflow.")
# Multi-process runs without a scheduler (SLURM and Cloud TPU pods are detected alone).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for a multi-process run (overrides $FLAXBERT_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the run (overrides $FLAXBERT_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (overrides "
    "$FLAXBERT_PROCESS_ID).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/ (train: required; eval: overrides).",
    lock_config=True)


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: flaxbert-cls {{{'|'.join(COMMANDS)}}} --workdir=DIR "
                         "[--config=FILE] [--config.KEY=VALUE ...]")
  command = argv[1]
  if command == "predict":
    for flag in (_MODEL, _INPUT, _OUTPUT):
      if not flag.value:
        raise UserError(f"predict needs --{flag.name}")
  elif command == "monitor":
    for flag in (_MODEL, _REFERENCE, _CURRENT):
      if not flag.value:
        raise UserError(f"monitor needs --{flag.name}")
  elif command == "plan":
    if not _LIST.value and (not _TOPOLOGY.value or _CONFIG.value is None):
      raise UserError("plan needs --config=FILE and --topology=NAME (or --list)")
  elif not _WORKDIR.value:
    raise UserError("--workdir is required")
  if command == "export" and not _OUTPUT.value:
    raise UserError("export needs --output=DIR (a new directory)")
  # Quiet libraries; our own INFO lines are the progress log.
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("flaxbert_cls").setLevel(std_logging.INFO)
  for noisy in ("absl", "jax", "orbax", "transformers", "datasets", "tensorflow"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)

  # Deferred on purpose (not a circle: nothing imports cli): flag errors and --help answer
  # before JAX, TensorFlow and transformers load.
  from flaxbert_cls.training import checkpoints  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import evaluate  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.serving import export  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.serving import predict  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.serving import pod_predict  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.report import page as report  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.model import sharding  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.training import train  # pylint: disable=g-import-not-at-top
  if command == "plan":
    _plan()
    return
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _loaded_config()
  if command == "train":
    if config is None:
      raise UserError("train needs --config=configs/<name>.py")
    result = train.train_and_evaluate(config, _WORKDIR.value)
    _print_metrics("dev", result["eval"])
    _send_report_page(config, _WORKDIR.value)
    _print_next_steps(_WORKDIR.value, report.page_path(_WORKDIR.value))
  elif command == "eval":
    results = evaluate.evaluate_workdir(_WORKDIR.value, config, checkpoints.parse_step(_STEP.value),
                                        _MEMBER.value)
    _print_metrics("eval", results)
  elif command == "report":
    print(f"report: {report.write_report(_WORKDIR.value)}", flush=True)
  elif command == "export":
    output = export.export(_WORKDIR.value, _OUTPUT.value, _STEP.value, _QUANTIZE.value,
                           _MEMBER.value, _FORMAT.value)
    print(f"exported: {output}", flush=True)
  elif command == "predict" and pod_predict.wants_parts(_INPUT.value, _OUTPUT.value):
    stats = pod_predict.predict_parts(
        _MODEL.value, _INPUT.value, _OUTPUT.value, _OUTPUT_FORMAT.value, _STEP.value,
        _TEXT_COLUMNS.value, _QUANTIZE.value, _BATCH_SIZE.value, _MEMBER.value,
        _chunk_rows(predict.CHUNK_ROWS))
    mine = stats["process"]
    print(f"predicted: process {mine['process']}: {mine['rows']} rows ({mine['rows_per_sec']:.1f}"
          f" examples/s); {_OUTPUT.value}: {stats['rows']} rows in {len(stats['parts'])} parts, "
          f"this run {stats['rows_per_sec']:.1f} examples/s in all", flush=True)
  elif command == "predict":
    stats = predict.predict_file(_MODEL.value, _INPUT.value, _OUTPUT.value, _STEP.value,
                                 _TEXT_COLUMNS.value, _QUANTIZE.value, _BATCH_SIZE.value,
                                 _MEMBER.value, _chunk_rows(predict.CHUNK_ROWS))
    print(f"predicted: {stats['rows']} rows -> {_OUTPUT.value} "
          f"({stats['examples_per_sec']:.1f} examples/s)", flush=True)
  elif command == "monitor":
    from flaxbert_cls.serving import monitor  # pylint: disable=g-import-not-at-top
    result = monitor.monitor(_MODEL.value, _REFERENCE.value, _CURRENT.value, _OUTPUT.value,
                             _PSI_THRESHOLD.value, _P_VALUE.value, _STEP.value,
                             _TEXT_COLUMNS.value, _LABEL_COLUMN.value)
    print(monitor.table(result), flush=True)
    if _OUTPUT.value:
      print(f"report: {_OUTPUT.value}/{monitor.REPORT_NAME}, {_OUTPUT.value}/"
            f"{monitor.FIGURE_NAME}", flush=True)
    print(monitor.verdict_line(result), flush=True)
    if result["verdict"] == "drift":
      sys.exit(monitor.DRIFT_EXIT_CODE)
  elif command == "track":
    from flaxbert_cls.tracking import trackers as tracking  # pylint: disable=g-import-not-at-top
    for name, sent in tracking.upload(_WORKDIR.value, _REPORT_TO.value, _OUTPUT.value).items():
      print(f"{name}: run {sent['run_id']} ({sent['new_values']} new metric values)", flush=True)


def _plan() -> None:
  """Compile the run's programs for --topology; exit 3 (one line) when one does not fit."""
  from flaxbert_cls.model import topologies  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.report import plan_table  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.plan import plan as plan_lib  # pylint: disable=g-import-not-at-top
  if _LIST.value:
    print("\n".join(topologies.accepted_topologies()), flush=True)
    return
  plan = plan_lib.make_plan(_loaded_config(), _TOPOLOGY.value, _NUM_SLICES.value,
                            _LARGEST_ONLY.value, _SAVE_COMPILED.value)
  print(plan_table.table(plan), flush=True)
  if _JSON.value:
    plan_table.write_json(plan, _JSON.value)
  if not plan.fits:
    print(plan_table.refusal_line(plan), file=sys.stderr, flush=True)
    sys.exit(plan_lib.NOT_FITTING_EXIT_CODE)


def _chunk_rows(default: int) -> int:
  return default if _CHUNK_ROWS.value is None else _CHUNK_ROWS.value


def _loaded_config():
  """The --config value; config_flags loads lazily, so a bad file surfaces here."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # a file that failed to load raises on first access
    return config
  except OSError as e:
    raise UserError(" ".join(str(e).split())) from None


def _print_metrics(name: str, results: dict[str, float]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"{name}: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()), flush=True)


def _send_report_page(config, workdir: str) -> None:
  """A run that reports to a tracker (MLflow) ends with its report page there too: the page
  is built, then `track`'s upload (idempotent: no metric twice) adds it to the artifacts."""
  import jax  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.report import page as report  # pylint: disable=g-import-not-at-top
  from flaxbert_cls.tracking import trackers as tracking  # pylint: disable=g-import-not-at-top
  names = [n for n in tracking.report_to(config) if n in tracking.TRACKER_NAMES]
  if names and jax.process_index() == 0:
    report.write_report(workdir)
    tracking.upload(workdir, tuple(names))


def _print_next_steps(workdir: str, page: str) -> None:
  """Where the report page will be, and how to look at the run in TensorBoard."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"report page: {page}  (build it: flaxbert-cls report --workdir={workdir})\n"
          f"TensorBoard: tensorboard --logdir={workdir}  (then open http://localhost:6006)",
          flush=True)


# A run's saved config as a config file (saved_config.get_config), for `eval --config.KEY=`.
_SAVED_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def _with_saved_config(argv: list[str]) -> list[str]:
  """`argv` plus --config=<this file>:<workdir> when `eval` overrides config keys without a
  --config file of its own."""
  if len(argv) < 2 or argv[1] != "eval":
    return argv
  overrides = any(a.startswith("--config.") for a in argv)
  has_file = any(a == "--config" or a.startswith("--config=") for a in argv)
  workdirs = [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
  if not overrides or has_file or not workdirs:
    return argv
  return [*argv[:2], f"--config={_SAVED_CONFIG_FILE}:{workdirs[-1]}", *argv[2:]]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with every flag or config-key error turned into one line."""
  # config_flags defines one `config.KEY` flag per key when it loads the file; drop
  # those of an earlier parse so `run()` can be called again in one process.
  for name in [n for n in flags.FLAGS if n.startswith(f"{_CONFIG.name}.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  try:
    return flags.FLAGS(_with_saved_config(argv))
  except flags.Error as e:
    raise UserError(" ".join(str(e).split())) from None
  except (AttributeError, KeyError) as e:  # --config.KEY for a KEY the config does not have
    detail = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
    raise UserError(f"unknown config key: {detail}") from None


def main() -> None:
  """Console-script entry point: `run()` with the host allocator set for steps
  (training/host_memory.py). Tests call `run()` and leave their process's allocator alone."""
  run(keep_freed_memory=True)


def run(keep_freed_memory: bool = False) -> None:
  """Runs the command in sys.argv: bad input is one line on stderr and exit status 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (clu writers) only; quiets its banner
  if sys.argv[1:2] == ["plan"]:  # compile-only: no TPU is used, nor its metadata server asked
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # plans and tests side by side
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs a false error
  try:
    if keep_freed_memory:  # before JAX starts the threads that allocate
      from flaxbert_cls.training import host_memory  # pylint: disable=g-import-not-at-top
      host_memory.keep_freed_memory()
    app.run(_main, flags_parser=_parse_flags)
  except UserError as e:
    print(f"flaxbert-cls: error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # a full disk in any writer not wrapped (exports, libraries): one line
    if e.errno not in workdir_lib.NO_SPACE:
      raise
    print(f"flaxbert-cls: error: {e.filename or 'a file'}: cannot write: "
          f"{os.strerror(e.errno).lower()}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f"flaxbert-cls: {e}; run the same command again to resume", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  main()
