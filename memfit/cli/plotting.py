"""Timeline plot: live bytes over one training step, stacked by category."""

from __future__ import annotations

from memfit.memory_plan import CATEGORY_ORDER, MemoryPlan


def plot_timeline(plan: MemoryPlan, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(plan.timeline)))
    series = [[c.get(cat, 0) / 2**20 for _, c in plan.timeline] for cat in CATEGORY_ORDER]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(xs, *series, labels=[c.replace("_", " ") for c in CATEGORY_ORDER])
    # Mark where each phase starts.
    last = None
    for i, (phase, _) in enumerate(plan.timeline):
        if phase != last:
            ax.axvline(i, color="k", lw=0.5, ls=":")
            ax.text(i, ax.get_ylim()[1] * 0.98 if i else 0, f" {phase}", va="top", fontsize=7)
            last = phase
    if plan.budget_bytes is not None:
        ax.axhline(plan.budget_bytes / 2**20, color="r", lw=1, label=f"budget {plan.budget}")
    ax.set_xlabel("allocation events (down-sampled) through forward, backward, optimizer step")
    ax.set_ylabel("live MiB")
    ax.set_title(f"{plan.model}: predicted peak {plan.peak_bytes / 2**20:.1f} MiB ({plan.peak_phase})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
