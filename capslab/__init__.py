"""The library the top-level scripts share: data, training, checkpoints, scoring, figures and
the notebook's helpers. `CapsNet.py` (the model and its loss) imports one piece of it, and only
if it is there: `fused_routing`, the compiled CPU routing; copied out alone, it runs without."""
