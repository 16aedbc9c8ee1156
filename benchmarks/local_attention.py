"""ModernBERT's local layers: what one attention costs on the band against the whole sequence.

  python benchmarks/local_attention.py [--lengths=512,2048] [--window=64] [--batch=2]

Times forward + backward (jit, median of --steps after a warm-up) of one attention at
[batch, L, 12 heads, 64] with padding, on this host's first device, for: the full attention
(a global layer) as `jax.nn.dot_product_attention`'s XLA path and as our einsums
(`attention.attention_with_dropout` at rate 0); the local one as `jax.nn.dot_product_attention`'s
`local_window_size` masks it (every score computed), as our einsum kernel masks it
(`attention.band_masked_attention`) and on the band only, in blocks (`attention.banded_attention`). The
encoder's XLA path takes the blocks on sequences longer than `attention.BANDED_MIN_WINDOWS` windows,
the band mask up to there. Our kernels run twice: in one pass over every (batch, head) pair, and
in cache-sized groups of pairs in turn (`blocked`, what `attention.attention` picks on one CPU
device: `attention.CACHE_BLOCK_BYTES_PER_CORE`). Prints a markdown table; figures are this
host's, at its load average.
"""

from __future__ import annotations

import argparse
import os

import bench_lib
import common  # pylint: disable=unused-import  (the repository root on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from flaxbert_cls.model import attention as attention_lib

HEADS, DIM = 12, 64


def _timed(fn, args, steps: int) -> float:
  grad = jax.jit(jax.grad(lambda q, k, v, n: jnp.sum(fn(q, k, v, n) ** 2), argnums=(0, 1, 2)))
  return bench_lib.time_steps(lambda: jax.block_until_ready(grad(*args)), 1, steps)[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="512,2048")
  parser.add_argument("--window", type=int, default=64, help="keys at most this far (ModernBERT: "
                      "local_attention // 2 = 64)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  w = args.window
  no_seeds = np.zeros((2,), np.uint32)
  ways = {
      "full, jax.nn.dot_product_attention (XLA)": lambda q, k, v, n: jax.nn.dot_product_attention(
          q, k, v, key_value_seq_lengths=n),
      f"local ±{w}, masked L x L": lambda q, k, v, n: jax.nn.dot_product_attention(
          q, k, v, key_value_seq_lengths=n, local_window_size=(w, w)),
  }
  for blocked, how in ((False, "one pass"), (True, "head groups")):
    ways |= {
        f"full, attention.attention_with_dropout, {how}": lambda q, k, v, n, b=blocked:
            attention_lib.attention_with_dropout(q, k, v, n, no_seeds, 0.0, b),
        f"local ±{w}, band mask on L x L (attention.band_masked_attention), {how}":
            lambda q, k, v, n, b=blocked: attention_lib.band_masked_attention(q, k, v, n, w, b),
        f"local ±{w}, banded (attention.banded_attention), {how}":
            lambda q, k, v, n, b=blocked: attention_lib.banded_attention(q, k, v, n, w, blocked=b),
    }
  print(f"device: {jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.2f}, "
        f"batch {args.batch}, {HEADS} heads x {DIM}, forward + backward, median of {args.steps}")
  print("\n| attention | " + " | ".join(f"L={n} ms" for n in args.lengths.split(",")) + " |")
  print("|---|" + "---|" * len(args.lengths.split(",")))
  rng = np.random.default_rng(0)
  for name, fn in ways.items():
    cells = []
    for length in (int(n) for n in args.lengths.split(",")):
      q, k, v = (jnp.asarray(rng.normal(size=(args.batch, length, HEADS, DIM)), jnp.float32)
                 for _ in range(3))
      lengths = jnp.asarray([length, length * 3 // 4][:args.batch] +
                            [length] * max(args.batch - 2, 0), jnp.int32)
      cells.append(f"{_timed(fn, (q, k, v, lengths), args.steps) * 1e3:.1f}")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
