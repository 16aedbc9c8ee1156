"""Report: a run's self-contained HTML page (`page`) and its matplotlib figures (`plots`);
`plan_table`: what `flaxbert-cls plan` prints.

Reads the workdir a run wrote (metrics files, eval predictions, checkpoints' metadata) and
the decisions layer's calibration; it imports training for reading a run, never serving.
"""
