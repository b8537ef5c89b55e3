"""Errors memfit raises on bad input. Each message names the cause and what to try."""

from __future__ import annotations


class MemfitError(Exception):
    """Base class of memfit's errors."""


class CaptureError(MemfitError):
    """The model could not be captured as a torch.fx graph."""


class BudgetError(MemfitError):
    """A budget is malformed, or no plan can meet it. `least_budget`: where the planner knows
    it, the smallest budget in bytes that it can meet (what `on_unmet="lowest"` plans for)."""

    def __init__(self, *args, least_budget: int | None = None):
        super().__init__(*args)
        self.least_budget = least_budget


class PassError(MemfitError):
    """A pass failed; the message names the pass and the passes that ran before it."""
