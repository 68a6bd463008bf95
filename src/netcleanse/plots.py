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


# How the labels were searched (netcleanse.report.ROLES): marker, size, colours, drawing order.
ROLE_STYLE = {
    "untested": {"marker": ".", "color": OKABE_ITO["grey"], "small": True},
    "candidate": {"marker": "^", "color": CLEAN, "small": False},
    "reference": {"marker": "s", "color": OKABE_ITO["orange"], "small": False, "hollow": True},
}


def mask_l1_figure(labels: Sequence[int], mask_l1: Sequence[float], flagged: Sequence[bool],
                   threshold_l1: float | None, median_l1: float | None, threshold: float,
                   true_targets: Sequence[int] = (), flag_rule: str | None = None,
                   rule_line: tuple[float, str] | None = None, roles: Sequence[str | None] | None = None,
                   role_names: dict[str, str] | None = None) -> Figure:
    """Every label's reversed-trigger size, with the MAD threshold and the flagged labels marked.

    Left: by label, so a reader finds a label. Right: sorted by L1, so the gap between the
    outliers and the bulk (the whole point of Neural Cleanse's test) is visible even for 1283 labels.
    ``flag_rule``: how the flagged labels were decided, for the legend (default: the MAD rule's
    "anomaly index > threshold"). ``rule_line``: (L1, legend text) of the deciding rule's threshold
    when it is not the MAD's (drawn solid; the MAD threshold stays dashed, for comparison).
    ``roles``: how each label was searched (keys of :data:`ROLE_STYLE`: coarse pass only, refined
    candidate, reference), each drawn with its own marker and named in the legend by
    ``role_names``; when every label has the same role (or ``roles`` is None) they are plain dots.
    """
    flag_rule = flag_rule or f"anomaly index > {threshold:g}"
    labels = np.asarray(labels)
    l1 = np.asarray(mask_l1, dtype=float)
    flagged = np.asarray(flagged, dtype=bool)
    targets = np.isin(labels, list(true_targets))
    many = len(labels) > 100
    dot = 6 if many else 30
    role_of = np.array(list(roles) if roles is not None else [None] * len(labels), dtype=object)
    kinds = [k for k in ROLE_STYLE if (role_of == k).any()]
    if len(kinds) < 2 or (role_of == None).any():  # noqa: E711 (elementwise)
        kinds = []  # one kind of label: no distinction to draw
    names = role_names or {}

    fig = Figure(figsize=(10, 4.8), layout="constrained")
    by_label, by_rank = fig.subplots(1, 2, width_ratios=[3, 2])
    order = np.argsort(l1, kind="stable")
    rank = np.empty(len(l1), dtype=int)
    rank[order] = np.arange(1, len(l1) + 1)

    for ax, x in ((by_label, labels), (by_rank, rank)):
        if not kinds:
            ax.scatter(x[~flagged], l1[~flagged], s=dot, color=CLEAN, alpha=0.7 if many else 0.9,
                       marker="o", linewidths=0, label="label")
        for kind in kinds:
            style, chosen = ROLE_STYLE[kind], (role_of == kind) & ~flagged
            size = (5 if many else 20) if style["small"] else (22 if many else 40)
            if style.get("hollow"):
                ax.scatter(x[chosen], l1[chosen], s=size, marker=style["marker"], facecolors="none",
                           edgecolors=style["color"], linewidths=1.1, zorder=3, label=names.get(kind, kind))
            else:
                ax.scatter(x[chosen], l1[chosen], s=size, marker=style["marker"], color=style["color"],
                           alpha=0.6 if style["small"] else 0.9, linewidths=0, zorder=2 if style["small"] else 3,
                           label=names.get(kind, kind))
        if flagged.any():
            ax.scatter(x[flagged], l1[flagged], s=60, color=FLAGGED, marker="D", edgecolors="black",
                       linewidths=0.6, zorder=4, label=f"flagged ({flag_rule})")
        if targets.any():
            ax.scatter(x[targets], l1[targets], s=150, facecolors="none", edgecolors=TARGET,
                       linewidths=1.8, zorder=5, label="planted target (ground truth)")
        fitted_on = " of the reference" if kinds else ""
        if median_l1 is not None:
            ax.axhline(median_l1, color=MEDIAN, linestyle=":", linewidth=1.2,
                       label=f"median L1{fitted_on} = {median_l1:.4g}")
        if threshold_l1 is not None:
            # below zero the threshold is out of reach (an inconclusive scan); keep it on the axis
            ax.axhline(max(threshold_l1, 0.0), color=THRESHOLD, linestyle="--", linewidth=1.4,
                       label=f"paper's threshold L1 = median − {threshold:g} × 1.4826 × MAD{fitted_on} "
                       f"= {threshold_l1:.4g}"
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
    handles, texts = by_label.get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside lower center", ncol=min(len(handles), 2 if kinds else 3), fontsize=8,
               frameon=False, markerscale=1.6 if many else 1.0)
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
                         threshold: float, flag_rule: str | None = None,
                         tested: Sequence[bool] | None = None) -> Figure:
    """Distribution of the labels' anomaly indices, flagged ones hatched, threshold drawn.

    Bin edges fall on the threshold, so no bar mixes flagged and unflagged labels. ``tested``:
    which labels were searched with the reference's budget; the others (the coarse pass only,
    indexed against the coarse pass's own median) are stacked beneath them in grey.
    """
    values = np.asarray(anomaly_index, dtype=float)
    flagged = np.asarray(flagged, dtype=bool)
    tested = np.ones(len(values), dtype=bool) if tested is None else np.asarray(tested, dtype=bool)
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
    parts = [(~tested & ~flagged, ROLE_STYLE["untested"]["color"], "coarse pass only (against the coarse median)"),
             (tested & ~flagged, CLEAN, "label" if tested.all() else "refined label (against the reference)")]
    parts = [part for part in parts if part[0].any()]
    if parts:
        ax.hist([values[m] for m, _, _ in parts], bins=bins, stacked=True, color=[c for _, c, _ in parts],
                edgecolor="white", linewidth=0.4, label=[n for _, _, n in parts], log=many)
    if flagged.any():
        ax.hist(values[flagged], bins=bins, color=FLAGGED, edgecolor="black", linewidth=0.6, hatch="///",
                label=f"flagged ({flag_rule or f'anomaly index > {threshold:g}'})", log=many)
    ax.axvline(threshold, color=THRESHOLD, linestyle="--", linewidth=1.4, label=f"threshold = {threshold:g}")
    ax.set_xlabel("anomaly index (MADs below the median mask L1, unitless)")
    ax.set_ylabel("number of labels" + (" (log scale)" if many else ""))
    ax.set_title("Distribution of anomaly indices (the paper's statistic)", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    if not many:
        ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return fig


def decision_figure(decision) -> Figure:
    """The calibrated test's decision, in its own statistic (the log-scale index ``z``).

    ``decision``: a :class:`netcleanse.report.DecisionInputs`. Drawn: a histogram of the reference
    labels' indices (the labels the null is fitted on) with the family's density (the per-label
    null); the simulated null of the largest index among all the model's labels, with its
    critical value at ``alpha`` and the region beyond it shaded; the other tested labels as ticks;
    each step-down step's label at its index with its p-value (flagged: filled diamond; the step
    that stopped: hollow).
    """
    ref = np.array(list(decision.reference.values()), dtype=float)
    tested = np.array(list(decision.tested.values()), dtype=float)
    steps = [s for s in decision.steps if s["index"] is not None and s["label"] is not None]
    critical = decision.critical_index
    null = decision.null
    points = [ref, tested, np.array([s["index"] for s in steps], dtype=float)]
    if critical is not None:
        points.append(np.array([critical]))
    if null is not None and len(null):
        # the null's far tail (long with few reference labels) is cut a little beyond the critical index
        tail = float(np.quantile(null, 0.995))
        points.append(np.array([min(tail, critical + 3.0) if critical is not None else tail]))
    values = np.concatenate([v[np.isfinite(v)] for v in points]) if points else np.zeros(1)
    low = min(float(values.min(initial=0.0)), -3.0) - 0.5
    high = max(float(values.max(initial=0.0)), 3.0) + 0.8

    fig = Figure(figsize=(10, 4.4), layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(low, high, 400)
    width = 0.25 if len(ref) >= 40 else 0.5  # a handful of reference labels: wider bins, fewer spikes
    bins = np.linspace(low, high, int(np.clip((high - low) / width, 10, 80)) + 1)
    ref_name = (f"the {len(ref)} reference labels (random controls)" if decision.n_reference
                else f"the {len(ref)} labels (every label is the reference)")
    if len(ref):
        ax.hist(ref, bins=bins, density=True, color=OKABE_ITO["orange"], alpha=0.55, edgecolor="white",
                linewidth=0.4, label=f"{ref_name}: their index")
    ax.plot(grid, decision.label_density(grid), color=OKABE_ITO["orange"], linewidth=2.0,
            label=f"null of one label's index: {decision.family_name} (median and scale of the reference)")
    if null is not None and len(null):
        counts, edges = np.histogram(null, bins=np.linspace(low, high, int(np.clip((high - low) / 0.1, 40, 200)) + 1))
        counts = counts / (len(null) * np.diff(edges))  # a density of all the draws, those off the axis included
        ax.stairs(counts, edges, color="black", linewidth=1.5,
                  label=f"null of the largest index among {decision.n_labels} labels (simulated)")
    top = ax.get_ylim()[1]
    if critical is not None:
        ax.axvspan(critical, high, color=FLAGGED, alpha=0.08, linewidth=0)
        ax.axvline(critical, color=FLAGGED, linewidth=1.8,
                   label=f"critical index {critical:.2f}: beyond it p ≤ α = {decision.alpha:g}")
    if len(tested):
        ax.plot(tested, np.full(len(tested), 0.0), linestyle="none", marker="|", markersize=14, color=CLEAN,
                markeredgewidth=1.2, label=f"the {len(tested)} other tested labels (candidates)", clip_on=False)
    for n, s in enumerate(steps):
        y = top * (0.62 - 0.14 * (n % 4))
        flagged = s["flagged"]
        ax.plot([s["index"]], [y], marker="D", markersize=8, linestyle="none",
                markerfacecolor=FLAGGED if flagged else "white", markeredgecolor="black" if flagged else FLAGGED,
                markeredgewidth=1.2, zorder=5,
                label=(None if n > 1 else "flagged label (step-down)" if flagged else "first label not flagged: stop"))
        ax.vlines(s["index"], 0, y, color=FLAGGED, linewidth=0.8, linestyle=":")
        p = s["p_value"]
        text = f"label {s['label']}\n{'p = ' + format(p, '.2g') if p is not None else 'p —'}"
        right = s["index"] > low + 0.85 * (high - low)  # near the right edge: write the text on the left
        ax.annotate(text, (s["index"], y), xytext=(-7 if right else 7, 2), textcoords="offset points", fontsize=9,
                    ha="right" if right else "left",
                    color=FLAGGED if flagged else "black", fontweight="bold" if flagged else "normal",
                    path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")])
    ax.set_xlim(low, high)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"log-scale index z = (median − {decision.statistic}) / scale of the reference "
                  "(larger = smaller trigger)")
    ax.set_ylabel("density")
    ax.set_title("The decision: each tested label's index against the null fitted to the reference", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
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
