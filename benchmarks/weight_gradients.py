"""A dense layer's weight gradient x^T·g on XLA:CPU, in the forms the compiler can be given.

  python benchmarks/weight_gradients.py [--tokens=4096] [--shapes=768x2304,1152x768,768x768]

x [tokens, in] and g [tokens, out] give dW = x^T·g [in, out]. Forms, each jit-compiled alone:
  transposed g   x contracted on dim 0 with g stored [out, tokens] (as ModernBERT's compiled
                 train step holds it): Eigen;
  x^T·g          x and g as stored, both contracted on dim 0: Eigen;
  stored x^T     x stored [in, tokens], a plain [in, tokens] @ [tokens, out]: YNNPACK, which
                 XLA gives only dots whose left operand contracts its last dimension;
  (g^T·x)^T      g stored [out, tokens] @ x: YNNPACK, the transposed result.
Prints a markdown table (median ms and GFLOP/s) and the kernel each form compiled to; figures
are this host's, at its load average (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os

import bench_lib
import common  # pylint: disable=unused-import  (the repository root on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FORMS = {
    "transposed g": lambda x, xt, g, gt: lax.dot_general(x, gt, (((0,), (1,)), ((), ()))),
    "x^T·g": lambda x, xt, g, gt: lax.dot_general(x, g, (((0,), (0,)), ((), ()))),
    "stored x^T": lambda x, xt, g, gt: xt @ g,
    "(g^T·x)^T": lambda x, xt, g, gt: (gt @ x).T,
}


def _kernel(fn, args) -> str:
  hlo = fn.lower(*args).compile().as_text()
  return "YNNPACK" if "ynn_fusion" in hlo else "Eigen"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=4096, help="batch x length (8 x 512)")
  parser.add_argument("--shapes", default="768x2304,1152x768,768x768",
                      help="in x out per weight (ModernBERT-base: Wqkv and Wi, mlp Wo, attn Wo)")
  parser.add_argument("--steps", type=int, default=7)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.2f}, "
        f"{args.tokens} tokens, median of {args.steps}")
  print("\n| in x out | " + " | ".join(f"{name} ms (GFLOP/s, kernel)" for name in FORMS) + " |")
  print("|---|" + "---|" * len(FORMS))
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    features_in, features_out = (int(n) for n in shape.split("x"))
    x = rng.normal(size=(args.tokens, features_in)).astype(np.float32)
    g = rng.normal(size=(args.tokens, features_out)).astype(np.float32)
    operands = tuple(jnp.asarray(a) for a in (x, np.ascontiguousarray(x.T), g,
                                              np.ascontiguousarray(g.T)))
    flops = 2 * args.tokens * features_in * features_out
    cells = []
    for form in FORMS.values():
      fn = jax.jit(form)
      seconds = bench_lib.time_steps(lambda: jax.block_until_ready(fn(*operands)), 1,
                                     args.steps)[1]
      cells.append(f"{seconds * 1e3:.1f} ({flops / seconds / 1e9:.0f}, {_kernel(fn, operands)})")
    print(f"| {shape} | " + " | ".join(cells) + " |")
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
