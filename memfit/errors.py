"""Errors memfit raises on bad input. Each message names the cause and what to try."""

from __future__ import annotations


class MemfitError(Exception):
    """Base class of memfit's errors."""


class CaptureError(MemfitError):
    """The model could not be captured as a torch.fx graph."""


class BudgetError(MemfitError):
    """A budget is malformed, or no plan can meet it."""


class PassError(MemfitError):
    """A pass failed; the message names the pass and the passes that ran before it."""
