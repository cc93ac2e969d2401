"""``sftjax plan``: memory per device and step time of a run, without training, and XLA's verdict on it.

``estimate.py`` computes the estimate from shapes and formulas (no weights read; see its docstring);
``compile.py`` compiles the real train step for this machine, a TPU slice or a GPU target; ``cli.py`` is the
command.
"""
