"""The perplexity-versus-context-length figure (PNG), as context-extension papers draw it."""

from __future__ import annotations

import os

from lctool.errors import LctoolError


def plot_ppl_vs_length(rows: list[dict], out_path: str, title: str, max_positions: int | None = None) -> str:
    """Write a PNG of perplexity against window length; returns the absolute path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["length"] for row in rows]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        axes.plot(lengths, [row["ppl"] for row in rows], marker="o")
        axes.set_xscale("log", base=2)
        axes.set_xticks(lengths, [str(n) for n in lengths])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("perplexity")
        axes.set_title(title, fontsize=9)
        axes.grid(True, alpha=0.3)
        if max_positions:
            axes.axvline(
                max_positions,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"max_position_embeddings {max_positions}",
            )
            axes.legend()
        figure.tight_layout()
        target = os.path.abspath(out_path)
        temporary = target + ".tmp.png"
        try:
            figure.savefig(temporary, format="png")
            os.replace(temporary, target)
        except OSError as e:
            raise LctoolError(f"cannot write the plot {out_path}: {e.strerror or e}") from None
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    finally:
        plt.close(figure)
    return target
