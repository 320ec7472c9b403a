"""Plot finishing shared by evaluate_matrix.py and study_report.py."""

import os

import matplotlib.pyplot as plt


def save_curve_panels(fig, axes, conditions, ylabel: str, title: str, path: str):
    """Finish and save a learning-curve figure with one panel per evaluation condition (evaluate_matrix.py's and
    study_report.py's)."""
    for ax, cond in zip(axes, conditions):
        ax.set_title(f"evaluated under {cond}" + (" (precomputed δ set)" if cond == "adversarial" else ""))
        ax.set_xlabel("online env steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_q_plot(fig, ax, title: str, path: str):
    """Finish and save a q-trajectory figure (evaluate_matrix.py's and study_report.py's): q in [0, 1] over online env
    steps, the title, a legend and a grid."""
    ax.set_xlabel("online env steps")
    ax.set_ylabel("perturbation probability q")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_figure(fig, path: str):
    """Save and close `fig`, atomically: through a temporary file unique to this process, then a rename."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
