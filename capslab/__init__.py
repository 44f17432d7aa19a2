"""The library the top-level scripts share: data, training, checkpoints, scoring, figures and
the notebook's helpers. `CapsNet.py` (the model and its loss) imports none of it."""
