"""Small, honest benchmark suites built offline (no download), for judging merges and compression.

Not part of the installed ``rankwise`` package: they train models and need scikit-learn (declared by the
``bench`` and ``test`` extras). Scripts in ``benchmarks/`` import them as ``suites`` (Python puts the
script's folder on ``sys.path``); ``tests/conftest.py`` adds ``benchmarks/`` to ``sys.path`` for the tests.
"""

from .digits import TASKS, DigitsSuite, load_digits_suite, make_model, train_classifier

__all__ = ["TASKS", "DigitsSuite", "load_digits_suite", "make_model", "train_classifier"]
