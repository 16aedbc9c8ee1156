"""`flaxbert-cls plan`'s output: the per-chip table, its JSON and the one line when a program
does not fit. Figures are the compiler's; step times are labelled estimates (rooflines)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from flaxbert_cls.plan import plan as plan_lib

_GIB = 2**30


def _gib(n: float) -> str:
  return f"{n / _GIB:.2f}"


def table(plan: plan_lib.Plan) -> str:
  """Markdown: one row per program, per chip, then the choices and the caveats."""
  chip = plan.chip
  if chip is None:
    return _host_table(plan)
  lines = [
      f"plan: {plan.topology}{f' x {plan.num_slices} slices' if plan.num_slices > 1 else ''}: "
      f"{plan.num_chips} {chip.name} chips ({_gib(chip.hbm_bytes)} GiB HBM, "
      f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s each); "
      f"mesh {plan.mesh}; {plan.num_params / 1e6:.1f}M parameters",
      "choices: " + ", ".join(f"{k}={v}" for k, v in plan.choices.items()),
      "",
      "| program | examples/step | args GiB (params+opt+batch) | temp GiB | total GiB | HBM margin "
      "GiB | XLA GFLOP | analytic GFLOP | all-reduce MB | all-gather MB | reduce-scatter MB | "
      "compute bound ms* | bytes bound ms* | tokens/s ceiling* | MFU ceiling* | compile s |",
      "|" + "---|" * 16,
  ]
  loops, kernels, no_cost = False, False, False
  for p in plan.programs:
    if p.refused:
      lines.append(f"| {p.name} | {p.examples} | {_gib(p.expected_argument_bytes)} | "
                   "refused: out of memory |" + " |" * 12)
      continue
    s, b = p.stats, plan.bounds(p)
    loops = loops or s.while_loops > 0
    kernels = kernels or s.kernel_calls > 0
    no_cost = no_cost or not s.cost_reported
    xla_flops = f"{s.flops / 1e9:.1f}" if s.cost_reported else "n/a"
    memory_ms = f"{b['memory_bound_s'] * 1e3:.2f}" if s.cost_reported else "n/a"
    collective = lambda op: f"{s.collectives[op].bytes / 1e6:.1f} ({s.collectives[op].count})" \
        if op in s.collectives else "0"  # pylint: disable=cell-var-from-loop
    lines.append(
        f"| {p.name} | {p.examples} | {_gib(s.argument_bytes)} | {_gib(s.temp_bytes)} | "
        f"{_gib(s.total_bytes)} | {_gib(chip.hbm_bytes - s.total_bytes)} | "
        f"{xla_flops} | "
        f"{p.analytic_flops / 1e9:.1f} | {collective('all-reduce')} | {collective('all-gather')} | "
        f"{collective('reduce-scatter')} | {b['compute_bound_s'] * 1e3:.2f} | "
        f"{memory_ms} | {b['tokens_per_s_ceiling']:,.0f} | "
        f"{b['mfu_ceiling']:.2f} | {p.compile_seconds:.0f} |")
  lines += [
      "",
      "Per chip, from the compiled programs (memory_analysis, cost_analysis, the optimized HLO's "
      "collectives: MB (count)). * estimates, not measured times: compute bound = analytic "
      "FLOPs / bf16 peak, bytes bound = XLA's bytes accessed / HBM bandwidth; the ceilings "
      "follow from the larger. Analytic FLOPs: 6·N·T + attention (12·layers·B·S²·hidden) per "
      "train step, a third of that per eval step; N = the encoder's matrices, the last layer "
      "on [CLS] only as the model runs it (ModernBERT: every layer on every token, GeGLU's "
      "three matrices, a local layer's attention over its window's keys only).",
  ]
  if loops or plan.accumulation_steps > 1:
    lines.append(f"XLA counts a loop body once (gradient_accumulation_steps="
                 f"{plan.accumulation_steps}, or loops XLA builds): its FLOPs and bytes are a "
                 "lower bound there; the analytic FLOPs are not.")
  if no_cost:
    lines.append("XLA's cost analysis reports nothing for this compile-only target (n/a): the "
                 "bounds and ceilings are the analytic FLOPs' alone, an upper bound on speed.")
  if kernels:
    lines.append("Splash attention runs as Pallas kernels, whose FLOPs XLA's cost analysis does "
                 "not see: XLA's GFLOP leave out attention there; the analytic FLOPs and the "
                 "bounds from them hold.")
  gradient = _gradient_reduction(plan)
  if gradient:
    lines.append(gradient)
  return "\n".join(lines)


def _host_table(plan: plan_lib.Plan) -> str:
  """`--topology=host`: this host's devices, which publish no peak figures: sizes only."""
  lines = [f"plan: {plan.topology}: {plan.num_chips} {plan.choices['platform']} devices; mesh "
           f"{plan.mesh}; {plan.num_params / 1e6:.1f}M parameters",
           "choices: " + ", ".join(f"{k}={v}" for k, v in plan.choices.items()), "",
           "| program | examples/step | args GiB | temp GiB | total GiB | XLA GFLOP | compile s |",
           "|" + "---|" * 7]
  for p in plan.programs:
    s = p.stats
    lines.append(f"| {p.name} | {p.examples} | {_gib(s.argument_bytes)} | {_gib(s.temp_bytes)} "
                 f"| {_gib(s.total_bytes)} | {s.flops / 1e9:.1f} | {p.compile_seconds:.0f} |")
  return "\n".join(lines)


def _gradient_reduction(plan: plan_lib.Plan) -> str:
  """Which dtypes the largest train program's all-reduces carry (the gradients)."""
  train = [p for p in plan.programs if p.kind == "train" and p.stats]
  if not train or "all-reduce" not in train[-1].stats.collectives:
    return ""
  by_dtype = train[-1].stats.collectives["all-reduce"].bytes_by_dtype
  total = sum(by_dtype.values())
  return ("all-reduce of " + train[-1].name + ": " + ", ".join(
      f"{dtype} {n / 1e6:.1f} MB ({n / total:.0%})" for dtype, n in sorted(by_dtype.items()))
          + " (kernel gradients reduce in the compute dtype: kernels are cast before use; "
          "docs/design.md)")


def refusal_line(plan: plan_lib.Plan) -> str:
  """One line for the first program that does not fit: where, how short, what to change."""
  p = next(p for p in plan.programs if p.refused)
  # libtpu: "... required for HLO temporaries (28.62G) exceeds available HBM (15.75G)".
  found = re.search(r"for ([\w ]+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                    p.refused)
  if found:
    what, need, have = found.group(1), float(found.group(2)), float(found.group(3))
    detail = f"{what} need {need:.2f}G of the {have:.2f}G HBM per chip ({need - have:.2f}G short)"
  else:
    detail = f"more than the {_gib(plan.chip.hbm_bytes)} GiB HBM per chip ({p.refused[:160]})"
  remat = ""
  if p.kind == "train" and plan.remat_fits:
    remat = f"set remat_policy='{plan.remat_fits}' (it fits then, recomputing activations), "
  elif p.kind == "train" and plan.remat_fits == "":
    remat = "(no remat_policy makes it fit) "
  return (f"plan: {p.name} does not fit a {plan.chip.name} chip on {plan.topology}: {detail}; "
          f"{remat}lower batch_size (or eval_batch_size), raise gradient_accumulation_steps, "
          "or shard the state over more chips (mesh_shape with fsdp > 1)")


def to_json(plan: plan_lib.Plan) -> dict[str, Any]:
  out = dataclasses.asdict(plan)
  for program, entry in zip(plan.programs, out["programs"]):
    if program.stats is not None:
      entry["stats"]["total_bytes"] = program.stats.total_bytes
      if plan.chip is not None:
        entry["estimates"] = plan.bounds(program)
    entry["name"] = program.name
  out["fits"] = plan.fits
  return out


def write_json(plan: plan_lib.Plan, path: str) -> None:
  with open(path, "w") as f:
    json.dump(to_json(plan), f, indent=1)
