"""Figures a person looks at after a run: the score histogram and per-image anomaly maps.

Figures are built with ``matplotlib.figure.Figure`` and saved by its Agg canvas, never through
``pyplot``: no global figure list to leak memory over thousands of saved maps, no GUI backend to
open on a headless server, and nothing that changes the caller's matplotlib state.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_THRESHOLD_STYLES = ("-", "--", "-.", ":")
_THRESHOLD_COLOURS = ("black", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink")


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def save_histogram(
    path: str | Path,
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: dict[str, float] | None = None,
    title: str = "",
) -> Path:
    """Overlapping histograms of normal and anomalous image scores, with threshold lines.

    Both classes share one set of bin edges so the overlap (the images no threshold can sort
    correctly) is visible bin by bin. Counts, not densities: a reader should see how many images
    fall on the wrong side of a line.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.size == 0 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must be non-empty and of equal length, got {scores.size} and {labels.size}"
        )
    anomalous = labels.astype(bool)
    low, high = float(scores.min()), float(scores.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    bin_edges = np.linspace(low, high, min(50, max(10, scores.size // 2)) + 1)

    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    for selected, name, colour in ((~anomalous, "normal", "tab:blue"), (anomalous, "anomalous", "tab:red")):
        if selected.any():
            label = f"{name} (n={int(selected.sum())})"
            axes.hist(scores[selected], bins=bin_edges, alpha=0.55, color=colour, label=label)
    for index, (name, value) in enumerate((thresholds or {}).items()):
        axes.axvline(
            value,
            color=_THRESHOLD_COLOURS[index % len(_THRESHOLD_COLOURS)],
            linestyle=_THRESHOLD_STYLES[index % len(_THRESHOLD_STYLES)],
            linewidth=1.5,
            label=f"{name} = {value:.4g}",
        )
    axes.set_xlabel("anomaly score")
    axes.set_ylabel("number of images")
    axes.set_title(title or "Score distribution")
    axes.legend(loc="best", fontsize="small")
    return _save(figure, path)


def verdict_title(score: float, threshold: float | None, title: str = "") -> str:
    """``"<title>  score 0.1234 (threshold 0.1000): ANOMALOUS"``; the verdict uses ``score >= threshold``."""
    text = f"score {score:.4f}"
    if threshold is not None:
        verdict = "ANOMALOUS" if score >= threshold else "NORMAL"
        text += f" (threshold {threshold:.4f}): {verdict}"
    return f"{title}  {text}" if title else text


def save_anomaly_map_figure(
    path: str | Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    score: float,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
) -> Path:
    """:func:`anomaly_map_figure` saved as a PNG at ``path``."""
    return _save(anomaly_map_figure(image, anomaly_map, mask, score, threshold, vmin, vmax, title), path)


def anomaly_map_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    score: float,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
) -> Figure:
    """One row of panels: input image, heat map, overlay and (when given) the ground-truth mask.

    ``vmin``/``vmax`` fix the colour scale; pass the same values for every image of a run so that
    equal colours mean equal scores across figures (per-image scaling makes every map look
    alarming). With a ``threshold`` the overlay outlines the region ``anomaly_map >= threshold``
    and the title gives the NORMAL/ANOMALOUS verdict of the image score.
    """
    image = np.asarray(image)
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly_map {anomaly_map.shape} must match the image size {image.shape[:2]}")
    if mask is not None:
        mask = np.asarray(mask).squeeze()
        if mask.shape != anomaly_map.shape:
            raise ValueError(f"mask {mask.shape} must match the anomaly map {anomaly_map.shape}")
    vmin = float(anomaly_map.min()) if vmin is None else vmin
    vmax = float(anomaly_map.max()) if vmax is None else vmax

    num_panels = 4 if mask is not None else 3
    figure = Figure(figsize=(4 * num_panels, 4.4))
    panels = figure.subplots(1, num_panels)
    panels[0].imshow(image)
    panels[0].set_title("image")

    heat = panels[1].imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax)
    panels[1].set_title("anomaly map")
    figure.colorbar(heat, ax=panels[1], fraction=0.046, pad=0.04)

    panels[2].imshow(image)
    panels[2].imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.5)
    panels[2].set_title("overlay")
    if threshold is not None:
        predicted = anomaly_map >= threshold
        # A contour needs both sides of the level; an all-normal or all-anomalous map has none.
        if predicted.any() and not predicted.all():
            panels[2].contour(predicted.astype(np.float64), levels=[0.5], colors="white", linewidths=1.2)

    if mask is not None:
        panels[3].imshow(mask.astype(bool), cmap="gray", vmin=0, vmax=1)
        panels[3].set_title("ground truth")

    for axes in panels:
        axes.set_axis_off()
    figure.suptitle(verdict_title(score, threshold, title))
    return figure


def image_figure(image: np.ndarray, mask: np.ndarray | None, score: float, threshold: float | None = None,
                 title: str = "") -> Figure:
    """The input image (and its ground-truth mask) under the verdict title: the picture of an image
    scored by a model that makes no anomaly map (DFKDE, GANomaly, DFM with ``score_type="nll"``)."""
    image = np.asarray(image)
    num_panels = 2 if mask is not None else 1
    figure = Figure(figsize=(4 * num_panels, 4.4))
    panels = np.atleast_1d(figure.subplots(1, num_panels))
    panels[0].imshow(image)
    panels[0].set_title("image")
    if mask is not None:
        panels[1].imshow(np.asarray(mask).squeeze().astype(bool), cmap="gray", vmin=0, vmax=1)
        panels[1].set_title("ground truth")
    for axes in panels:
        axes.set_axis_off()
    figure.suptitle(verdict_title(score, threshold, title))
    return figure


def figure_bytes(figure: Figure, image_format: str = "png", dpi: int = 100) -> bytes:
    """The figure encoded in memory (``"png"`` or ``"jpeg"``), for pages that embed their images."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    options = {"pil_kwargs": {"quality": 85}} if image_format == "jpeg" else {}
    figure.savefig(buffer, format=image_format, dpi=dpi, bbox_inches="tight", **options)
    return buffer.getvalue()
