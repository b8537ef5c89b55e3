"""Pareto frontier of plans and the budget-monotone choice from it."""

from __future__ import annotations

from typing import Sequence, TypeVar

P = TypeVar("P")


def pareto(plans: Sequence[P]) -> list[P]:
    """Plans that no other plan beats on both extra time and peak.

    Each plan has `.extra_time_s` and `.peak_bytes`. Sorted by extra time ascending (peak
    strictly descending along the list); ties broken by fewer recomputed units, then by
    the plan's key, so the result does not depend on the input order.
    """
    ordered = sorted(plans, key=lambda p: (p.extra_time_s, p.peak_bytes, p.key()))
    out: list[P] = []
    for p in ordered:
        if not out or p.peak_bytes < out[-1].peak_bytes:
            out.append(p)
    return out


def pick(frontier: Sequence[P], budget_bytes: int) -> P | None:
    """The fastest plan on `frontier` whose predicted peak fits `budget_bytes`.

    Along a Pareto frontier a smaller budget can only move the choice towards lower
    peaks, so the predicted peak is monotone in the budget. None: nothing fits.
    """
    for p in frontier:
        if p.peak_bytes <= budget_bytes:
            return p
    return None
