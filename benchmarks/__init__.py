"""sharpmeter's benchmarks, run as modules from the repository root: ``python -m benchmarks.hvp``,
``python -m benchmarks.peers``, ``python -m benchmarks.overhead`` (see ``benchmarks/README.md``).
"""
