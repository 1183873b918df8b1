"""The paper side: its synthetic curves, the analyses and the comparison, without torch.

* ``simulator/``: the paper's simulator, its tables and synthetic curves;
* ``analysis/``: scaling fits, three-phase fits, prediction, correlation, robust finals,
  replicates, and the runs as the analyses read them;
* ``compare``: measured curves against the simulator, a verdict per claim;
* ``report``: the Markdown and HTML report with figures;
* ``records``: JSONL and CSV record files; ``sizes``: ``"125M"`` <-> ``1.25e8``.

Nothing here imports torch (or the harness): it reads what a run left on disk, with the names of
:mod:`sharpmeter.measure.schema`. ``tests/test_layout.py`` holds it to that.
"""
