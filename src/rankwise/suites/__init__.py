"""Small, honest benchmark suites built offline (no download), for judging merges and compression."""

from .digits import TASKS, DigitsSuite, load_digits_suite, make_model, train_classifier

__all__ = ["TASKS", "DigitsSuite", "load_digits_suite", "make_model", "train_classifier"]
