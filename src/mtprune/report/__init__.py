"""Reports of a run: the paper's tables (Markdown) and figures (PNG, matplotlib) from ``results.json``."""

from mtprune.report.plots import plot_channels, plot_miou_vs_epochs, plot_miou_vs_macs, plot_qualitative
from mtprune.report.tables import render_report, write_report

__all__ = [
    "plot_channels",
    "plot_miou_vs_epochs",
    "plot_miou_vs_macs",
    "plot_qualitative",
    "render_report",
    "write_report",
]
