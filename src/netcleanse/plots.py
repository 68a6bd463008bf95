"""The report's figures, drawn with matplotlib's object-oriented API on the Agg canvas.

No pyplot: figures are built as :class:`matplotlib.figure.Figure` objects and rendered straight to
PNG bytes, so drawing a report never touches a user's interactive backend or global state.
Colours are the Okabe-Ito palette (safe for the common colour-vision deficiencies), and every
distinction that colour carries is also carried by marker shape, line style or hatching.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import patheffects
from matplotlib.figure import Figure
from PIL import Image

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}
CLEAN = OKABE_ITO["blue"]
FLAGGED = OKABE_ITO["vermillion"]
THRESHOLD = OKABE_ITO["black"]
MEDIAN = OKABE_ITO["grey"]
TARGET = OKABE_ITO["bluish_green"]

# Beyond this many flagged labels, number only the lowest ones so the text stays legible.
MAX_ANNOTATIONS = 12


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes (Agg)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def mask_l1_figure(labels: Sequence[int], mask_l1: Sequence[float], flagged: Sequence[bool],
                   threshold_l1: float | None, median_l1: float | None, threshold: float,
                   true_targets: Sequence[int] = (), flag_rule: str | None = None,
                   rule_line: tuple[float, str] | None = None, reference: Sequence[bool] | None = None) -> Figure:
    """Every label's reversed-trigger size, with the MAD threshold and the flagged labels marked.

    Left: by label, so a reader finds a label. Right: sorted by L1, so the gap between the
    outliers and the bulk (the whole point of Neural Cleanse's test) is visible even for 1283 labels.
    ``flag_rule``: how the flagged labels were decided, for the legend (default: the MAD rule's
    "anomaly index > threshold"). ``rule_line``: (L1, legend text) of the deciding rule's threshold
    when it is not the MAD's (drawn solid; the MAD threshold stays dashed, for comparison).
    ``reference``: which labels the decision's median and spread come from (hollow squares).
    """
    flag_rule = flag_rule or f"anomaly index > {threshold:g}"
    labels = np.asarray(labels)
    l1 = np.asarray(mask_l1, dtype=float)
    flagged = np.asarray(flagged, dtype=bool)
    targets = np.isin(labels, list(true_targets))
    many = len(labels) > 100
    dot = 6 if many else 30

    fig = Figure(figsize=(10, 4.6), layout="constrained")
    by_label, by_rank = fig.subplots(1, 2, width_ratios=[3, 2])
    order = np.argsort(l1, kind="stable")
    rank = np.empty(len(l1), dtype=int)
    rank[order] = np.arange(1, len(l1) + 1)

    for ax, x in ((by_label, labels), (by_rank, rank)):
        ax.scatter(x[~flagged], l1[~flagged], s=dot, color=CLEAN, alpha=0.7 if many else 0.9,
                   marker="o", linewidths=0, label="label")
        if flagged.any():
            ax.scatter(x[flagged], l1[flagged], s=60, color=FLAGGED, marker="D", edgecolors="black",
                       linewidths=0.6, zorder=3, label=f"flagged ({flag_rule})")
        if reference is not None and np.asarray(reference, dtype=bool).any():
            ref = np.asarray(reference, dtype=bool)
            ax.scatter(x[ref], l1[ref], s=40, marker="s", facecolors="none", edgecolors=OKABE_ITO["orange"],
                       linewidths=1.1, zorder=3, label="reference label (the median and spread come from these)")
        if targets.any():
            ax.scatter(x[targets], l1[targets], s=150, facecolors="none", edgecolors=TARGET,
                       linewidths=1.8, zorder=4, label="planted target (ground truth)")
        if median_l1 is not None:
            ax.axhline(median_l1, color=MEDIAN, linestyle=":", linewidth=1.2,
                       label=f"median L1 = {median_l1:.4g}")
        if threshold_l1 is not None:
            # below zero the threshold is out of reach (an inconclusive scan); keep it on the axis
            ax.axhline(max(threshold_l1, 0.0), color=THRESHOLD, linestyle="--", linewidth=1.4,
                       label=f"threshold L1 = median − {threshold:g} × 1.4826 × MAD = {threshold_l1:.4g}"
                       + (" (< 0: no label can pass)" if threshold_l1 <= 0 else ""))
        if rule_line is not None:
            ax.axhline(max(rule_line[0], 0.0), color=FLAGGED, linestyle="-", linewidth=1.4, label=rule_line[1])
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("mask L1 norm (pixels)")

    by_label.set_xlabel("label (class index)")
    by_label.set_title(f"Reversed-trigger size of each of the {len(labels)} labels", fontsize=11)
    by_rank.set_xlabel("rank by mask L1 (1 = smallest trigger)")
    by_rank.set_title("Sorted: outliers sit below the threshold", fontsize=11)
    if len(labels) > 60:
        by_rank.set_xscale("log")  # spreads the few smallest triggers apart from the bulk
        by_rank.set_xlabel("rank by mask L1 (1 = smallest trigger, log scale)")

    # Number the flagged points, most anomalous first, without overprinting.
    candidates = [i for i in order if flagged[i]]
    # Sorted, neighbours are similar labels: group them ("563, 337, 796…"). By label, skip crowded ones.
    _annotate_apart(by_label, [(labels[i], l1[i], str(labels[i])) for i in candidates], per_group=1)
    _annotate_apart(by_rank, [(rank[i], l1[i], str(labels[i])) for i in candidates], per_group=3)
    handles, names = by_label.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    return fig


def _annotate_apart(ax, points: Sequence[tuple[float, float, str]], gap: tuple[float, float] = (0.13, 0.07),
                    per_group: int = 3) -> None:
    """Write the points' texts so that they do not overprint: a point within ``gap`` (axes fraction,
    x and y, since text is wider than tall) of an earlier one joins its group, written "a, b, c…".
    Every flagged label is also listed in the report's text; the plot only has to stay legible."""
    ax.autoscale_view()  # settle the data limits so that distances in axes fraction are final
    to_axes = ax.transData + ax.transAxes.inverted()
    groups: list[tuple[np.ndarray, tuple[float, float], list[str]]] = []
    for x, y, text in points:
        where = to_axes.transform((x, y))
        near = next((g for g in groups if abs(where[0] - g[0][0]) < gap[0] and abs(where[1] - g[0][1]) < gap[1]), None)
        if near is not None:
            near[2].append(text)
        elif len(groups) < MAX_ANNOTATIONS:
            groups.append((where, (x, y), [text]))
    for _, anchor, texts in groups:
        shown = ", ".join(texts[:per_group]) + ("…" if len(texts) > per_group > 1 else "")
        ax.annotate(shown, anchor, xytext=(8, 3), textcoords="offset points", fontsize=9, color=FLAGGED,
                    fontweight="bold", path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")])


def anomaly_index_figure(anomaly_index: Sequence[float], flagged: Sequence[bool],
                         threshold: float, flag_rule: str | None = None) -> Figure:
    """Distribution of the labels' anomaly indices, flagged ones hatched, threshold drawn.

    Bin edges fall on the threshold, so no bar mixes flagged and unflagged labels.
    """
    values = np.asarray(anomaly_index, dtype=float)
    flagged = np.asarray(flagged, dtype=bool)
    many = len(values) > 100
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.subplots()
    high = max(float(values.max(initial=0.0)), threshold) * 1.04 + 0.05
    low = min(float(values.min(initial=0.0)), 0.0)
    if threshold > 0:
        per_unit = max(1, min(10 if many else 4, int(120 * threshold / (high - low))))
        width = threshold / per_unit
        bins = threshold + width * np.arange(np.floor((low - threshold) / width), np.ceil((high - threshold) / width) + 1)
    else:
        bins = np.linspace(low, high, 41 if many else 21)
    ax.hist(values[~flagged], bins=bins, color=CLEAN, edgecolor="white", linewidth=0.4, label="label",
            log=many)
    if flagged.any():
        ax.hist(values[flagged], bins=bins, color=FLAGGED, edgecolor="black", linewidth=0.6, hatch="///",
                label=f"flagged ({flag_rule or f'anomaly index > {threshold:g}'})", log=many)
    ax.axvline(threshold, color=THRESHOLD, linestyle="--", linewidth=1.4, label=f"threshold = {threshold:g}")
    ax.set_xlabel("anomaly index (MADs below the median mask L1, unitless)")
    ax.set_ylabel("number of labels" + (" (log scale)" if many else ""))
    ax.set_title("Distribution of anomaly indices", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    if not many:
        ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return fig


def repair_curve_figure(curves: Sequence[tuple[str, Sequence[dict]]],
                        saved_points: Sequence[tuple[str, Sequence[dict]]] = ()) -> Figure:
    """Clean accuracy and attack success rate versus the fraction of channels pruned.

    ``curves`` are (method, rows with fraction_pruned, clean_accuracy, attack_success) with
    fractions in [0, 1]; ``saved_points`` are the table rows of saved models, drawn as markers.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "-.", ":", (0, (5, 1))]
    for n, (method, rows) in enumerate(curves):
        x = [100 * float(r["fraction_pruned"]) for r in rows]
        suffix = f" ({method})" if len(curves) > 1 else ""
        if any(r.get("clean_accuracy") is not None for r in rows):
            ax.plot(x, [_pct(r.get("clean_accuracy")) for r in rows], color=CLEAN, linestyle=styles[n % 4],
                    linewidth=1.8, label="clean accuracy" + suffix)
        if any(r.get("attack_success") is not None for r in rows):
            ax.plot(x, [_pct(r.get("attack_success")) for r in rows], color=FLAGGED,
                    linestyle=(0, (4, 2)) if len(curves) == 1 else styles[n % 4], linewidth=1.8,
                    label="attack success rate" + suffix)
    for method, rows in saved_points:
        rows = [r for r in rows if r.get("fraction_pruned") is not None]
        x = [100 * float(r["fraction_pruned"]) for r in rows]
        ax.scatter(x, [_pct(r.get("clean_accuracy")) for r in rows], marker="o", s=40, color=CLEAN,
                   edgecolors="black", zorder=3, label=f"saved model ({method})")
        ax.scatter(x, [_pct(r.get("attack_success")) for r in rows], marker="s", s=40, color=FLAGGED,
                   edgecolors="black", zorder=3)
    ax.set_xlabel("channels pruned (% of the layer)")
    ax.set_ylabel("rate on the test set (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Fine-pruning: clean accuracy and attack success as channels are removed", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def _pct(value) -> float:
    return float("nan") if value is None else 100 * float(value)


def array_png(image: np.ndarray, min_height: int = 96) -> bytes:
    """An image array (H x W or C x H x W, values in [0, 1]) as PNG bytes, enlarged by whole pixels.

    Nearest-neighbour enlargement keeps a reversed trigger's pixels crisp where browsers or
    Markdown viewers would otherwise blur a 28 x 28 image.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))
    pixels = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return image_png(Image.fromarray(pixels), min_height)


def image_png(image: Image.Image, min_height: int = 96) -> bytes:
    """A PIL image as PNG bytes, enlarged by an integer factor to at least ``min_height`` pixels."""
    factor = max(1, -(-min_height // max(1, image.height)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
