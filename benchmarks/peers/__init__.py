"""sharpmeter side by side with PyHessian, curvlinops and hessian-eigenthings (issue 5).

``python -m benchmarks.peers`` in the peers' venv; what is measured: ``benchmarks/README.md``.

- :mod:`.problems`: the models, batches and losses every tool gets;
- :mod:`.tools`: one adapter per tool, counting its HVPs;
- :mod:`.reference`: the dense Hessian and the training before measuring;
- :mod:`.accuracy`, :mod:`.convergence`, :mod:`.side_effects`: the float64 problems' worker;
- :mod:`.speed`, :mod:`.critical`: the float32 problems' workers;
- :mod:`.tables`, :mod:`.report`: ``results/peers.md``; :mod:`.__main__`: the command line.
"""
