"""Where ONNX Runtime spends a forward, dense against pruned, by operator (issue 32, item 1 in ONNX Runtime).

ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) on the nets ``bench/mobile.py`` saved: the dense
net and its ``--round-to auto`` plan at 0.5× MACs, exported as ``mtprune export`` does and run in sessions set up
as ``cost --runtime onnxruntime`` times them (all graph optimisations, torch's thread count, no spinning), one
forward of each per round, alternating. Per operator type after ORT's graph optimisations (its NCHWc blocked
convs, the reorders into and out of that layout, the element-wise and resize ops): ms per forward of the dense
and the pruned net, their ratio and the share of the pruned net's time; and the time outside any node (the
session's own per-run cost).

    python bench/ort_profile.py --mobile runs/mobile [--nets …] [--size 512 512] [--runs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from mobile import machine  # bench/: the script's folder is on sys.path

NETS = [
    "torchvision_lraspp_mobilenet_v3_large",
    "torchvision_deeplabv3_mobilenet_v3_large",
    "deeplabv3_efficientnet_lite0",
]


def _session(path: Path, prefix: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _by_op(profile: Path, runs: int) -> tuple[dict[str, float], dict[str, float], float]:
    """ms per forward by operator type and by node, and the wall ms per forward of the timed runs (warm-up left out: the
    profile's last ``runs`` model runs)."""
    events = json.loads(profile.read_text())
    model_runs = [e for e in events if e.get("name") == "model_run"]
    start = model_runs[-runs]["ts"]
    ops: dict[str, float] = defaultdict(float)
    nodes: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            ops[e["args"]["op_name"]] += e["dur"] / 1000.0 / runs
            nodes[f"{e['name'][: -len('_kernel_time')]} ({e['args']['op_name']})"] += e["dur"] / 1000.0 / runs
    wall = sum(e["dur"] for e in model_runs[-runs:]) / 1000.0 / runs
    return dict(ops), dict(nodes), wall


def profile_pair(dense_dir: Path, pruned_dir: Path, size: tuple[int, int], runs: int, threads: int) -> dict:
    import numpy as np

    from mtprune import load_model
    from mtprune.cost import count_macs
    from mtprune.export import export_onnx

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mtprune-ortprof-") as tmp:
        sessions, macs = {}, {}
        for name, folder in (("dense", dense_dir), ("pruned", pruned_dir)):
            model = load_model(folder).eval()
            macs[name] = count_macs(model, size)
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", size)
            sessions[name] = _session(path, Path(tmp) / name, threads)
        x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
        for _ in range(5):  # warm-up
            for s in sessions.values():
                s.run(None, {"image": x})
        for r in range(runs):
            for name in sessions if r % 2 == 0 else reversed(list(sessions)):
                sessions[name].run(None, {"image": x})
        for name, s in sessions.items():
            ops, nodes, wall = _by_op(Path(s.end_profiling()), runs)
            out[name] = {"ops_ms": ops, "by_node_ms": nodes, "wall_ms": wall, "nodes_ms": sum(ops.values())}
            out[name]["macs"] = macs[name]
    out["macs_ratio"] = out["pruned"]["macs"] / out["dense"]["macs"]
    return out


def _table(net: str, r: dict, top: int = 10) -> list[str]:
    d, p = r["dense"], r["pruned"]
    lines = [
        f"### {net}: MACs × {r['macs_ratio']:.3f}, wall {d['wall_ms']:.1f} → {p['wall_ms']:.1f} ms "
        f"(× {p['wall_ms'] / d['wall_ms']:.3f}); outside nodes {d['wall_ms'] - d['nodes_ms']:.2f} → "
        f"{p['wall_ms'] - p['nodes_ms']:.2f} ms",
        "",
        "| operator | dense ms | pruned ms | × | share of pruned | excess ms over MACs × |",
        "|---|---|---|---|---|---|",
    ]
    names = sorted(set(d["ops_ms"]) | set(p["ops_ms"]), key=lambda k: -p["ops_ms"].get(k, 0.0))
    for op in names:
        a, b = d["ops_ms"].get(op, 0.0), p["ops_ms"].get(op, 0.0)
        ratio = f"{b / a:.3f}" if a > 0 else "–"
        excess = b - r["macs_ratio"] * a
        lines.append(f"| {op} | {a:.2f} | {b:.2f} | {ratio} | {100 * b / p['wall_ms']:.0f} % | {excess:+.2f} |")
    shared = set(d["by_node_ms"]) & set(p["by_node_ms"])
    worst = sorted(shared, key=lambda k: r["macs_ratio"] * d["by_node_ms"][k] - p["by_node_ms"][k])[:top]
    lines += ["", f"nodes of both graphs whose time shrinks least (excess ms over MACs ×; {len(shared)} shared):", ""]
    for k in worst:
        a, b = d["by_node_ms"][k], p["by_node_ms"][k]
        lines.append(f"- {k}: {a:.3f} → {b:.3f} ms ({b - r['macs_ratio'] * a:+.3f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mobile", type=Path, default=Path("runs/mobile"), help="bench/mobile.py's --out")
    ap.add_argument("--nets", nargs="+", default=NETS)
    ap.add_argument("--size", type=int, nargs=2, default=[512, 512])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    result: dict[str, Any] = {**machine(a), "nets": {}}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    for net in a.nets:
        r = profile_pair(a.mobile / net / "dense", a.mobile / net / "rtauto", tuple(a.size), a.runs, a.threads)
        result["nets"][net] = r
        print("\n".join(_table(net, r)), "\n", flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
