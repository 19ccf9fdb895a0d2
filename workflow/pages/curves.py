"""Training curves: the train stage's loss and lr per step (workflow/formats/trainlog.py reads them),
smoothed, drawn as PNG figures.

    from workflow.pages import curves
    history = {"step": steps, "loss": loss, "lr": lr}                   # float arrays, as trainlog gives them
    png = curves.loss_plot_png(history)                                 # one run: loss over lr
    png = curves.overlay_plot_png([("lr-1e-3", "#1f77b4", history), ...])  # several runs in one plot

Figures are drawn with matplotlib's Agg backend in its default style (any matplotlibrc is ignored)
and saved without metadata, so the same history gives the same PNG bytes.
"""

from __future__ import annotations

import io

import numpy as np

HISTORY_COLUMNS = ("step", "loss", "lr")
SMOOTHING_POINTS = 20  # the moving average spans 1/20 of the logged steps


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` values; the result is len(values) - window + 1 long."""
    window = max(1, min(window, len(values)))
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def finite_loss(history: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) where both are finite and the loss positive (it is drawn on a log scale)."""
    steps, loss = history["step"], history["loss"]
    keep = np.isfinite(steps) & np.isfinite(loss) & (loss > 0)
    return steps[keep], loss[keep]


def smoothed(steps: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A centred moving average (each mean drawn at its window's middle step: no visual lag)."""
    window = max(1, len(loss) // SMOOTHING_POINTS)
    centre = (window - 1) // 2
    return steps[centre : len(steps) - window + 1 + centre], moving_average(loss, window), window


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _style():
    import matplotlib.style

    return matplotlib.style.context("default")


def loss_plot_png(history: dict, size: tuple[float, float] = (11.5, 4.4)) -> bytes:
    """One run: the loss (log scale, raw faint + moving average) over a small learning-rate panel."""
    with _style():
        fig = _figure(size)
        ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        steps, loss = finite_loss(history)
        _loss_axes(ax_loss)
        x, y, window = smoothed(steps, loss)
        if window > 1:
            ax_loss.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
            ax_loss.plot(x, y, color="tab:blue", linewidth=1.8, label=f"moving average ({window} steps)")
            ax_loss.legend(loc="upper right", frameon=False)
        elif len(loss):  # too few steps to smooth
            ax_loss.plot(steps, loss, color="tab:blue", linewidth=1.8)
        else:
            _note(ax_loss, "no finite loss values")
        _lr_axes(ax_lr)
        keep = np.isfinite(history["step"]) & np.isfinite(history["lr"])
        if keep.any():
            ax_lr.plot(history["step"][keep], history["lr"][keep], color="tab:orange", linewidth=1.4)
        else:
            _note(ax_lr, "no learning-rate values")
        return _png(fig)


def legend_text(name: str) -> str:
    """A user's name (an experiment's) as literal legend text: matplotlib reads $...$ as maths and hides
    a label that begins with an underscore."""
    text = name.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def overlay_plot_png(runs: list, size: tuple[float, float] = (11.5, 4.8)) -> bytes:
    """Several runs: (label, colour, history) each; smoothed losses overlaid (raw ones faint) over
    their learning rates, one colour per run."""
    with _style():
        fig = _figure(size)
        ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        _loss_axes(ax_loss)
        _lr_axes(ax_lr)
        drawn = 0
        for label, colour, history in runs:
            steps, loss = finite_loss(history)
            if len(loss):
                x, y, _ = smoothed(steps, loss)
                ax_loss.plot(steps, loss, color=colour, alpha=0.15, linewidth=0.7)
                ax_loss.plot(x, y, color=colour, linewidth=1.8, label=legend_text(label))
                drawn += 1
            keep = np.isfinite(history["step"]) & np.isfinite(history["lr"])
            ax_lr.plot(history["step"][keep], history["lr"][keep], color=colour, linewidth=1.3)
        if drawn:
            ax_loss.legend(loc="upper right", frameon=False, ncol=max(1, min(4, drawn // 6 + 1)))
        else:
            _note(ax_loss, "no finite loss values")
        return _png(fig)


SWEEP_LABELS = {"num_inference_steps": "sampling steps", "guidance_scale": "classifier-free guidance scale w"}


def sweep_plot_png(
    setting: str,
    values: np.ndarray,
    fid: np.ndarray,
    size: tuple[float, float] = (5.6, 3.4),
    best: tuple[float, float] | None = None,
) -> bytes:
    """FID against one swept setting (a point per value, joined in value order); `best` (value, FID) is
    marked with a star."""
    with _style():
        fig = _figure(size)
        ax = fig.subplots()
        order = np.argsort(values, kind="stable")
        ax.plot(values[order], fid[order], color="tab:green", marker="o", linewidth=1.6)
        if best is not None:
            ax.plot([best[0]], [best[1]], color="tab:red", marker="*", markersize=16, linestyle="none", label="best")
            ax.legend(frameon=False)
        ax.set_xlabel(SWEEP_LABELS.get(setting, setting))
        ax.set_ylabel("FID (lower is better)")
        ax.grid(True, alpha=0.25)
        return _png(fig)


def errorbar_plot_png(
    series: list, xlabel: str, ylabel: str, log_x: bool = False, size: tuple[float, float] = (6.4, 4.0)
) -> bytes:
    """Several lines of (label, x, mean, standard deviation) arrays, each point with its error bar."""
    with _style():
        fig = _figure(size)
        ax = fig.subplots()
        for label, x, mean, sd in series:
            order = np.argsort(x, kind="stable")
            ax.errorbar(x[order], mean[order], yerr=sd[order], marker="o", capsize=3, linewidth=1.6, label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
        if series:
            ax.legend(frameon=False)
        return _png(fig)


def _loss_axes(ax) -> None:
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)


def _lr_axes(ax) -> None:
    ax.set_ylabel("learning rate")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.25)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
