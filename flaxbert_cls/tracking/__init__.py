"""Experiment trackers (MLflow) beside TensorBoard: writers the training loop feeds, and `track`."""
