"""Training overhead of ``SharpnessCallback``: a ~10M GPT-2 trained by the Hugging Face Trainer on
CPU, with and without the callback at its default settings, in one process.

``python -m benchmarks.overhead``; what is measured: ``benchmarks/README.md``.

- :mod:`.training`: the model sizes, the Trainer and training past it;
- :mod:`.short`: alternating short runs on the plain every-10 grid and each measure alone
  (``results/overhead.md``);
- :mod:`.long`: both arms at once over a long run at the default schedule, in two child
  processes (``--long STEPS``, ``results/overhead_long.md``);
- :mod:`.tables`: the Markdown tables of both; :mod:`.__main__`: the command line.
"""
