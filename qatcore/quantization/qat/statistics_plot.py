"""The picture of a :class:`QATStatistics`: one figure, three panels, titled.

    1. each quantizer's scale (mean over channels) against the training step, log scale;
    2. each activation quantizer's observed range: its max as a solid line, its min
       dashed, in the quantizer's colour;
    3. the fraction of elements each quantizer clipped at the last sample, a bar each.

The figure's title says what trained (``title``: the run passes its model, data set and
quantization scheme) and over how many steps. Legends sit to the right of their panel,
outside the axes, in as many columns as the quantizers need, so they never cover a
curve; the figure grows with the number of quantizers so that the bar labels stay
apart. Needs matplotlib (``pip install 'qatcore[plot]'``), imported only when a figure
is drawn.
"""

from __future__ import annotations

import math
from typing import Any

from qatcore.errors import QATCoreError

__all__ = ["statistics_figure", "LEGEND_ROWS"]

LEGEND_ROWS = 28  # entries per legend column before another column starts


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise QATCoreError(
            "QATStatistics.plot needs matplotlib, which is not installed: pip install 'qatcore[plot]' "
            "(summary() and to_json() work without it)"
        ) from e
    return plt


def _legend_outside(axis) -> None:
    """The axis's legend to the right of it, outside the data area, in enough columns."""
    handles, labels = axis.get_legend_handles_labels()
    if handles:
        axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                    fontsize="x-small", ncol=math.ceil(len(handles) / LEGEND_ROWS), frameon=False)


def statistics_figure(statistics: Any, title: str | None = None) -> Any:
    """The matplotlib Figure of ``statistics`` (module docstring); the caller saves and closes it.

    Args:
        statistics: the ``QATStatistics`` to draw (not imported here: it imports this module).
        title: what trained, e.g. ``"cnn on digits: 8-bit weights, 8-bit activations"``;
            None: just "QAT statistics".
    """
    plt = _pyplot()
    names = list(statistics.quantizers)
    # inches: each line panel tall enough for a legend column, the bars for a label each, and
    # the width for the data plus the legend's columns
    columns = max(1, math.ceil(len(names) / LEGEND_ROWS))
    panel = max(3.0, 0.14 * min(len(names), LEGEND_ROWS))
    bars = max(3.0, 0.17 * len(names))
    fig, axes = plt.subplots(3, 1, figsize=(9 + 2.6 * columns, 2 * panel + bars + 1.5), constrained_layout=True,
                             gridspec_kw={"height_ratios": (panel, panel, bars)})
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    clipped_names, clips = [], []
    for index, (name, q) in enumerate(statistics.quantizers.items()):
        colour = colours(index % colours.N)
        scale = q.series.get("scale_mean")
        if scale is not None and len(scale):
            axes[0].plot(scale.steps, scale.values, color=colour, label=name)
        if q.kind == "activation":
            for key, style in (("observed_max", "-"), ("observed_min", "--")):
                series = q.series.get(key)
                if series is not None and len(series):
                    axes[1].plot(series.steps, series.values, style, color=colour,
                                 label=name if key == "observed_max" else None)
        clipped = q.series.get("clip_fraction")
        if clipped is not None and len(clipped):
            clipped_names.append(name)
            clips.append(100 * float(clipped.last()))
    axes[2].barh(clipped_names, clips)
    axes[2].invert_yaxis()  # the first quantizer on top, as in the legends
    axes[2].tick_params(axis="y", labelsize="x-small")
    axes[0].set(title="scale (mean over channels)", xlabel="step", yscale="log")
    axes[1].set(title="activation ranges (observer max solid, min dashed)", xlabel="step")
    axes[2].set(title="elements clipped at the last sample (%)", xlabel="%")
    for axis in axes[:2]:
        _legend_outside(axis)
    heading = title if title is not None else "QAT statistics"
    recorded = (f"last sample at training step {statistics.last_step}, one every {statistics.config.every} steps"
                if statistics.last_step >= 0 else "no training step recorded")
    fig.suptitle(f"{heading}\n{recorded}", fontsize="large")
    return fig
