"""vlmtune: preference optimisation and RL with verifiable rewards for vision-language models.

``NAME`` is the one home of the package's name (the import package, the distribution and the
command are all called this); ``__version__`` is the one home of its version (pyproject.toml reads
it from here when the wheel is built).
"""

NAME = __name__
__version__ = "0.1.0"
