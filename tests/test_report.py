"""The run report's warnings."""

from __future__ import annotations

from mtprune.report.tables import slower_than_dense


def _row(method: str, latency: float | None, macs: float, **kw):
    return {"method": method, "tag": f"{method}-macs0.5", "target": {"macs": 0.5}, "ratio": 0.5,
            "thresholds": "-", "latency_ratio": latency, "macs_ratio": macs, **kw}  # fmt: skip


def test_a_pruned_net_no_faster_than_dense_is_named_with_the_fix():
    rows = [_row("dense", 1.0, 1.0), _row("uniform", 1.43, 0.75), _row("mtp", 0.62, 0.5), _row("fpgm", None, 0.5)]
    found = slower_than_dense(rows, round_to=1)
    assert found == [
        "warning: uniform macs 0.5× is 1.43× the dense net's latency at 0.75× its MACs; run.round_to: auto prunes "
        "to counts the runtime's kernels are fast at (docs/deployment-speed.md)"
    ]
    assert slower_than_dense(rows, round_to="auto") == [
        "warning: uniform macs 0.5× is 1.43× the dense net's latency at 0.75× its MACs (docs/deployment-speed.md)"
    ]
    assert slower_than_dense([_row("uniform", 1.01, 0.97)], round_to=1) == []  # about as much work: no claim
    several = [*rows, _row("thinet", 1.05, 0.5), _row("fpgm", 1.7, 0.75)]
    assert slower_than_dense(several, round_to="auto") == [
        "warning: 3 pruned models are no faster than the dense net at less work (1.05–1.70× its latency at "
        "0.50–0.75× its MACs; slowest: fpgm macs 0.5×) (docs/deployment-speed.md)"
    ]
