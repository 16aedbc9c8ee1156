"""Read a split, then batches that are a pure function of (seed, step).

Splits are tokenized once (`tokenization.py`) and kept ragged; a batch is padded to the
smallest configured bucket length that fits it, so the number of compiled shapes
is bounded by the number of buckets. Every process computes the same global batch
indices (cheap integers) and materializes only its own rows of each batch.

With long_document='windows' a batch row is still one document: its windows fill a
[windows, seq] slab (`pad_documents`), so batching, sharding and resume are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from flaxbert_cls.errors import UserError
from flaxbert_cls.data import packing
from flaxbert_cls.data.tokenization import TokenizedSplit

log = logging.getLogger(__name__)


def bucket_for(length: int, buckets: Sequence[int], max_seq_length: int) -> int:
  """The smallest bucket >= length (buckets above max_seq_length are ignored)."""
  for b in sorted(buckets):
    if length <= b <= max_seq_length:
      return b
  return max_seq_length


def pad_rows(split: TokenizedSplit, rows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Rows -> padded arrays; a row index of -1 is an all-padding example with weight 0."""
  n = len(rows)
  input_ids = np.zeros((n, seq_len), np.int32)
  token_type_ids = np.zeros((n, seq_len), np.int32)
  attention_mask = np.zeros((n, seq_len), np.int32)
  weights = (rows >= 0).astype(np.float32)
  for i, r in enumerate(rows):
    if r < 0:
      continue
    a, b = split.offsets[r], split.offsets[r + 1]
    input_ids[i, :b - a] = split.input_ids[a:b]
    token_type_ids[i, :b - a] = split.token_type_ids[a:b]
    attention_mask[i, :b - a] = 1
  batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
               weights=weights)
  if split.labels is not None:
    batch["labels"] = split.labels_at(rows)
  return batch


def window_bucket(count: int, most: int) -> int:
  """Window slots for a batch whose longest document has `count` windows: the next power
  of two, at most the split's `most` (few compiled shapes, little padding)."""
  return min(1 << (max(count, 1) - 1).bit_length(), max(most, 1))


def pad_documents(split: TokenizedSplit, docs: np.ndarray, seq_len: int,
                  num_windows: int, windows: Sequence[np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
  """Documents -> [docs, num_windows, seq_len] arrays plus window_mask [docs, num_windows];
  a document index of -1 is all padding with weight 0. `windows`: the window rows each
  document keeps (default: all of its windows)."""
  rows = np.full((len(docs), num_windows), -1, np.int64)
  for i, d in enumerate(docs):
    if d >= 0:
      kept = (np.arange(split.documents[d], split.documents[d + 1]) if windows is None
              else windows[i])
      rows[i, :len(kept)] = kept
  padded = pad_rows(dataclasses.replace(split, labels=None, documents=None), rows.reshape(-1),
                    seq_len)
  batch = {k: padded[k].reshape(len(docs), num_windows, seq_len)
           for k in ("input_ids", "token_type_ids", "attention_mask")}
  batch["window_mask"] = padded["weights"].reshape(len(docs), num_windows)
  batch["weights"] = (docs >= 0).astype(np.float32)
  if split.labels is not None:
    batch["labels"] = split.labels_at(docs)
  return batch


def sample_windows(split: TokenizedSplit, docs: np.ndarray, k: int, rng: np.random.Generator,
                   keep_first: bool = False) -> list[np.ndarray]:
  """At most `k` of each document's windows (rows of `split`), drawn without replacement and
  kept in reading order; a document with k or fewer keeps all. -1 (padding) keeps none.
  `keep_first`: the first window always, k - 1 drawn from the rest."""
  kept = []
  for d in docs:
    if d < 0:
      kept.append(np.zeros(0, np.int64))
      continue
    first, stop = int(split.documents[d]), int(split.documents[d + 1])
    rows = np.arange(first, stop)
    if stop - first <= k:
      kept.append(rows)
    elif keep_first:
      kept.append(np.concatenate([rows[:1], np.sort(rng.choice(rows[1:], k - 1, replace=False))]))
    else:
      kept.append(np.sort(rng.choice(rows, k, replace=False)))
  return kept


def pad_batch(split: TokenizedSplit, global_rows: np.ndarray, buckets: Sequence[int],
              max_seq_length: int, sharding: jax.sharding.Sharding | None = None,
              windows_per_document: int = 0, rng: np.random.Generator | None = None,
              keep_first_window: bool = False) -> dict[str, np.ndarray]:
  """This process's part (`process_rows` by `sharding`) of global batch `global_rows`
  (examples; -1 = padding), padded to the bucket of the global batch's longest row (and
  window bucket, with windows). `windows_per_document` > 0 (with `rng`): each document
  keeps that many of its windows, drawn for the global batch, so every process agrees
  (`keep_first_window`: its first among them). Packed rows (`global_rows` [rows, examples],
  `packing.PackedOrder`) fill max_seq_length tokens each."""
  if global_rows.ndim == 2:
    return packing.pad_packed(split, process_rows(global_rows, sharding), max_seq_length)
  real = global_rows[global_rows >= 0]
  if split.documents is None:
    seq_len = bucket_for(int(split.lengths[real].max()), buckets, max_seq_length)
    return pad_rows(split, process_rows(global_rows, sharding), seq_len)
  if windows_per_document > 0:
    kept = sample_windows(split, global_rows, windows_per_document, rng, keep_first_window)
    most = min(int(split.window_counts.max()), windows_per_document)
  else:
    kept = [np.arange(split.documents[d], split.documents[d + 1]) if d >= 0
            else np.zeros(0, np.int64) for d in global_rows]
    most = int(split.window_counts.max())
  every = np.concatenate(kept)
  seq_len = bucket_for(int(split.lengths[every].max()), buckets, max_seq_length)
  mine = local_positions(len(global_rows), sharding)
  return pad_documents(split, global_rows[mine], seq_len,
                       window_bucket(max(len(w) for w in kept), most), [kept[i] for i in mine])


@dataclasses.dataclass
class TrainOrder:
  """Which examples form global batch `step`: a pure function of (seed, step).

  Each epoch is a fresh permutation; the last partial batch of an epoch is dropped
  (its examples come first in another epoch's order). With `grouping_window` > 0,
  examples are sorted by length within windows of that many batches and the batch
  order is shuffled again, so batches hold similar lengths and pad less.
  """

  lengths: np.ndarray
  batch_size: int
  seed: int
  grouping_window: int = 0

  def __post_init__(self):
    if len(self.lengths) < self.batch_size:
      raise UserError(f"training set has {len(self.lengths)} examples, fewer than "
                      f"batch_size={self.batch_size}")
    self._cached_epoch = None

  @property
  def steps_per_epoch(self) -> int:
    return len(self.lengths) // self.batch_size

  def _epoch_batches(self, epoch: int) -> np.ndarray:
    if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
      return self._cached_epoch[1]
    rng = np.random.default_rng([self.seed, epoch])
    perm = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.batch_size]
    if self.grouping_window > 0:
      window = self.grouping_window * self.batch_size
      for s in range(0, len(perm), window):
        chunk = perm[s:s + window]
        perm[s:s + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
      batches = perm.reshape(self.steps_per_epoch, self.batch_size)
      batches = batches[rng.permutation(self.steps_per_epoch)]
    else:
      batches = perm.reshape(self.steps_per_epoch, self.batch_size)
    self._cached_epoch = (epoch, batches)
    return batches

  def batch_indices(self, step: int) -> np.ndarray:
    epoch, index = divmod(step, self.steps_per_epoch)
    return self._epoch_batches(epoch)[index]


def mixing_probabilities(sizes: Sequence[int], weights: Sequence[float], mixing: str,
                         temperature: float = 1.0) -> np.ndarray:
  """p(task) ~ weight * size^(1/T): T=1 'proportional', T 'temperature', T=inf 'equal'."""
  sizes = np.asarray(sizes, np.float64)
  exponent = {"proportional": 1.0, "temperature": 1.0 / temperature, "equal": 0.0}[mixing]
  p = np.asarray(weights, np.float64) * sizes ** exponent
  return p / p.sum()


@dataclasses.dataclass
class TaskMixture:
  """Which task and which of its examples form global batch `step`: pure in (seed, step).

  Each step trains one task, drawn with `probabilities`; a task's k-th draw takes batch k
  of its own `TrainOrder` (epochs of that task's data). Draws come in blocks seeded by
  (seed, block); per-task counts at block starts are cached, so any step is cheap to
  reach on resume. One task is the single-task run: every step is that task's step.
  """

  orders: Sequence[TrainOrder]
  probabilities: np.ndarray
  seed: int
  block: int = 1024

  def __post_init__(self):
    self._blocks: dict[int, np.ndarray] = {}
    self._counts = [np.zeros(len(self.orders), np.int64)]  # draws before block b

  def _draws(self, b: int) -> np.ndarray:
    if b not in self._blocks:
      if len(self._blocks) > 8:
        self._blocks.clear()
      rng = np.random.default_rng([self.seed, 0x6D6978, b])  # 'mix': apart from data seeds
      self._blocks[b] = rng.choice(len(self.orders), size=self.block, p=self.probabilities)
    return self._blocks[b]

  def task_for_step(self, step: int) -> int:
    if len(self.orders) == 1:
      return 0
    return int(self._draws(step // self.block)[step % self.block])

  def task_steps(self, step: int) -> tuple[int, int]:
    """(task, how many earlier steps trained that task)."""
    if len(self.orders) == 1:
      return 0, step
    b, i = divmod(step, self.block)
    while len(self._counts) <= b:
      n = len(self._counts) - 1
      self._counts.append(self._counts[n] + np.bincount(self._draws(n),
                                                        minlength=len(self.orders)))
    draws = self._draws(b)
    task = int(draws[i])
    return task, int(self._counts[b][task] + np.count_nonzero(draws[:i] == task))

  def batch_indices(self, step: int) -> tuple[int, np.ndarray]:
    task, k = self.task_steps(step)
    return task, self.orders[task].batch_indices(k)

  @property
  def steps_per_epoch(self) -> int:
    return sum(o.steps_per_epoch for o in self.orders)


def train_batch(splits: Sequence[TokenizedSplit], mixture: TaskMixture, step: int,
                buckets: Sequence[int], max_seq_length: int, labels_dtype: Any = None,
                sharding: jax.sharding.Sharding | None = None,
                label_width: int | None = None, windows_per_document: int = 0,
                keep_first_window: bool = False) -> dict[str, np.ndarray]:
  """This process's rows of global batch `step`, padded to the global batch's bucket.

  The step's task comes from `mixture` (one task: every step); with several tasks the
  batch also holds `task_ids` per row. `sharding`: the batch sharding `to_global` uses.
  `label_width`: labels become [rows, label_width] (multi-hot rows from the left, a class
  id or score in column 0), so single- and multi-label tasks share one jit signature.
  `windows_per_document` > 0: documents train on that many of their windows, drawn anew at
  each step from (seed, step) (`sample_windows`): resume draws the same ones;
  `keep_first_window`: each document's first window always among them.
  """
  task, rows = mixture.batch_indices(step)
  rng = np.random.default_rng([mixture.seed, 0x77696E, step])  # 'win': apart from data seeds
  batch = pad_batch(splits[task], rows, buckets, max_seq_length, sharding,
                    windows_per_document, rng, keep_first_window)
  if len(splits) > 1:
    examples = batch["weights"].shape  # [rows] or, packed, [rows, examples]
    batch["task_ids"] = np.full(examples, task, np.int32)
    if labels_dtype is not None and "labels" in batch:
      batch["labels"] = batch["labels"].astype(labels_dtype)  # one jit signature for all tasks
    if label_width is not None and "labels" in batch:
      labels = batch["labels"].reshape(*examples, -1)
      batch["labels"] = np.zeros((*examples, label_width), labels.dtype)
      batch["labels"][..., :labels.shape[-1]] = labels
  return batch


def process_rows(global_rows: np.ndarray, sharding: jax.sharding.Sharding | None = None
                 ) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, in batch order."""
  return global_rows[local_positions(len(global_rows), sharding)]


def local_positions(global_size: int, sharding: jax.sharding.Sharding | None) -> np.ndarray:
  """Sorted positions of a global batch held by this process's devices.

  From the sharding itself, so they need not be one contiguous block: the mesh keeps
  mesh_utils' device order (ICI rings on TPU) even where it alternates hosts. Without a
  sharding: the p-th of P equal blocks.
  """
  if sharding is None:
    per_process = global_size // jax.process_count()
    return np.arange(per_process) + jax.process_index() * per_process
  held = np.zeros(global_size, bool)
  for index in sharding.addressable_devices_indices_map((global_size,)).values():
    held[index[0]] = True
  return np.flatnonzero(held)


def _global_size(local_size: int, sharding: jax.sharding.Sharding) -> int:
  """The global batch size whose share on this process is `local_size` rows."""
  if sharding.is_fully_replicated:
    return local_size
  # Probe with a size every shard count divides: this process holds `mine` of `shards` blocks.
  probe = (sharding.num_devices,)
  shards = probe[0] // sharding.shard_shape(probe)[0]
  mine = len({index[0].start for index in sharding.addressable_devices_indices_map(probe).values()})
  return local_size * shards // mine


def eval_batches(split: TokenizedSplit, batch_size: int, buckets: Sequence[int],
                 max_seq_length: int, sharding: jax.sharding.Sharding | None = None
                 ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
  """Every example exactly once: sorted by length (less padding), last batch padded

  with weight-0 rows. Yields (global row indices, -1 for padding; this process's batch).
  """
  order = np.argsort(split.document_lengths, kind="stable")
  num_batches = -(-len(order) // batch_size)
  padded = np.full(num_batches * batch_size, -1, np.int64)
  padded[:len(order)] = order
  for rows in padded.reshape(num_batches, batch_size):
    yield rows, pad_batch(split, rows, buckets, max_seq_length, sharding)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles this process's rows (`process_rows` with the same sharding) into global arrays."""
  local_size = len(next(iter(batch.values())))
  global_size = _global_size(local_size, sharding)
  positions = local_positions(global_size, sharding)

  def assemble(local: np.ndarray) -> jax.Array:
    def device_rows(index: tuple[slice, ...]) -> np.ndarray:
      rows = range(*index[0].indices(global_size))
      start = int(np.searchsorted(positions, rows.start))
      return local[(slice(start, start + len(rows)), *index[1:])]
    return jax.make_array_from_callback((global_size, *local.shape[1:]), sharding, device_rows)

  return {k: assemble(v) for k, v in batch.items()}


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs `iterator` in a background thread so host batching overlaps device compute."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
