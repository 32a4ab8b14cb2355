"""Evaluation of a segmentor on ACDC (being split into one module per concern)."""

from .prediction import *  # noqa: F403
