"""The measurement library: sharpness of a PyTorch model measured while it trains.

* ``operators``: the Hessian of the probe loss as a matrix-free operator (HVPs), and its
  preconditioned form;
* ``estimators/``: pure functions of a square operator (``eigen``: Lanczos and power
  iteration; ``trace``: Hutchinson and Hutch++; ``directional``: one-HVP directional sharpness);
* ``linesearch``: critical sharpness, a forward-only line search that moves the model's
  parameters (and puts them back);
* ``directions``: the optimizer's next update direction and Adam's preconditioner;
* ``meter``, ``measures``, ``options``, ``schedule``: the meter, its table of measures, its one
  options object and when it measures;
* ``context``: the measurement context that puts back everything a measurement could disturb;
* ``loss``: the probe loss and its gradient; ``params``: flat parameter vectors;
  ``distributed``: DDP and FSDP; ``rng``: forked random streams; ``checks``: argument checks;
* ``sinks``: where rows go (JSONL, W&B); ``files``: atomic writes; ``schema``: the names a run
  leaves on disk (no torch: the paper side reads them).

Its user-facing names are exported by :mod:`sharpmeter` itself. This file imports nothing, so
that importing the torch-free :mod:`sharpmeter.measure.schema` does not import torch.
"""
