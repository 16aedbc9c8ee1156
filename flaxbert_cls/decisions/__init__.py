"""Decisions: from a model's logits to scores and the choices a user acts on.

Owns the metrics of each task (`metrics`), probability calibration (`calibration`),
decision thresholds with their cross-fitted estimates (`thresholds`) and the run's
`decisions.json` (`tuning`: fitted after an evaluation, loaded by eval, predict and
export). Pure NumPy/SciPy over arrays and label maps: it imports `data.tasks` for the
problem types and nothing from model, training or serving.
"""
