"""The GPT-2 study harness: train a ladder of GPT-2 sizes with the sharpness callback.

* ``config``: the run and study configs (YAML and ``--key value``), checked before training;
* ``data``: corpora and tokenizers into blocks of tokens; ``gpt``: the named GPT-2 sizes;
* ``train``: one run (``recipes/train_gpt.py``); ``study``: the ladder of sizes, then the report;
* ``commands``: the ``sharpmeter study``, ``compare`` and ``report`` subcommands;
* ``runlock``: one run or study per output folder.

It uses the measurement library (:mod:`sharpmeter.measure`, :mod:`sharpmeter.integrations`)
and the paper side's report (:mod:`sharpmeter.paper.report`); neither imports it.
"""
