"""Real speed-up against MACs: dense against pruned nets of the paper's models at the paper's sizes.

    python bench/latency.py [--models deeplabv3_resnet101 pspnet_resnet50 bisenet_resnet18]
                            [--ratios 0.25 0.5] [--plans uniform irregular] [--round-to 1 8 16 auto]
                            [--runtime R[,R…]] [--timing device=cpu runs=20 threads=2 host_memory=… dtype=…]
                            [--dtypes float32 bfloat16]
                            [--size H W] [--profile] [--per-layer] [--skip-timing] [--json FILE] | --render FILE…

For each model: the dense net, then for each plan kind (``uniform``: every prunable layer keeps the same
fraction; ``irregular``: ``bn`` scores on random γ, the uneven channel counts MTP produces), ratio and
``--round-to``, the pruned net. Every pruned net of a model is timed against its dense net pair by pair, in
every layout and variant (``mtprune.cost.latency_against``, as ``mtprune cost --against``: one batch-1 forward
of each per round, CUDA synchronised), so the machine's drift hits both alike; each cell is the median and IQR
over rounds, and ratios are paired per round. "Best against best" compares each net in its fastest setup
with dense in its fastest — the figure a deployment engineer ships. ``--render FILE…`` prints saved
``--json`` files as markdown.
Setups in mtprune's timing vocabulary (``--runtime``, as ``mtprune cost``: ``eager``, ``channels-last``,
``fold-bn``, ``channels-last+fold-bn``, ``compile``, ``onnxruntime``, ``best``; default ``best``) and
``--timing`` (``device``, ``runs``, ``threads`` — 2 here unless given —, ``host_memory``, ``dtype``).
``--round-to auto`` times its convs as ``mtprune prune --round-to auto`` does in the same ``--runtime``.
``--profile`` prints the self time of each operator, dense against pruned: which work shrinks with the MACs
and which does not; ``--per-layer`` times every layer (forward hooks) and lists the layers whose time shrinks
least against their work (MACs, or channels for BN/ReLU), in the first eager setup named. Each net's page
faults per forward are in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from mtprune.cli.model_args import timing_of
from mtprune.config import Timing
from mtprune.cost import Setup, count_macs, count_params, latency_against, paired_ratio, setups_of, timed_as
from mtprune.cost.host_memory import host_memory
from mtprune.cost.latency import timing_warning
from mtprune.cost.layers import channels_text, compare_layers, excess_by_kind, layer_profiles
from mtprune.cost.runtimes import TORCH, setup_dict
from mtprune.cost.tables import LatencyTable
from mtprune.cost.timing import table_setup
from mtprune.models import build_model
from mtprune.pruning import apply_plan, make_plan
from mtprune.pruning.fit import latency_fit

SIZES = {"deeplabv3_resnet101": (513, 513), "pspnet_resnet50": (513, 513), "bisenet_resnet18": (1024, 2048)}
CLASSES = {"deeplabv3_resnet101": 21, "pspnet_resnet50": 150, "bisenet_resnet18": 19}


#: --round-to auto: the counts this machine likes, timed in the --runtime named (mtprune prune --round-to auto)
AUTO = ("auto",)


def _build(name: str, a) -> torch.nn.Module:
    """A dense net of ``name`` (a built-in name or a spec such as ``torchvision:lraspp_mobilenet_v3_large``);
    ``--coupled`` applies to specs and the EfficientNet-Lite nets."""
    kw = {"coupled": a.coupled} if (":" in name or "efficientnet" in name) else {}
    return build_model(name, CLASSES.get(name, 21), **kw)


def setups(a) -> dict[str, Setup]:
    """The setups ``--runtime`` names, by label."""
    return {st.label: st for st in setups_of(a.timing)}


def eager_setup(a) -> Setup:
    """The first eager PyTorch setup named (profiles need modules): ``eager`` when none is."""
    return next((st for st in setups_of(a.timing) if st.runtime == TORCH and not st.compile), Setup())


def build_nets(name: str, a) -> dict[str, tuple[dict, torch.nn.Module]]:
    """``{label: (row, model)}``: the dense net, then one pruned net per plan kind, ratio and round-to (a plan
    with the same channel counts as an earlier one is not timed twice)."""
    size = tuple(a.size) if a.size else SIZES.get(name, (512, 512))
    torch.manual_seed(0)
    dense = _build(name, a)
    dmacs = count_macs(dense, size)
    nets = {
        "dense": ({"plan": "dense", "ratio": 0.0, "round_to": 1, "params": count_params(dense), "macs": dmacs}, dense)
    }
    seen: dict[tuple, str] = {}
    for plan_kind in a.plans:
        for ratio in a.ratios:
            for rt in a.round_to:
                torch.manual_seed(1)
                model = _build(name, a)
                if plan_kind == "irregular":
                    with torch.no_grad():
                        for m in model.modules():
                            if isinstance(m, torch.nn.BatchNorm2d):
                                m.weight.uniform_(0.0, 1.0)
                method = "bn" if plan_kind == "irregular" else "uniform"
                fit = None
                if rt in AUTO:  # the counts this machine likes, timed as mtprune prune --round-to auto times them
                    runtime, cl = table_setup(a.timing)
                    table = LatencyTable(a.timing.table, a.timing.device, cl, runtime=runtime)
                    fit = latency_fit(model, size, table)
                plan = make_plan(model, method, ratio, round_to=1 if rt in AUTO else rt, fit=fit)
                label = f"{plan_kind} {ratio} rt{rt}"
                key = (plan_kind, ratio, tuple(sorted((k, len(lp.kept)) for k, lp in plan.layers.items())))
                if key in seen:
                    print(f"  ({label}: same channel counts as {seen[key]}, not timed again)")
                    continue
                seen[key] = label
                apply_plan(model, plan)
                row = {"plan": plan_kind, "ratio": ratio, "round_to": rt}
                row.update({"params": count_params(model), "macs": count_macs(model, size)})
                nets[label] = (row, model)
    return nets


def timing_row(label: str, timed: dict, sts: dict[str, Setup]) -> dict:
    """A net's cells from :func:`latency_against`'s result; ``dense``: the reference's own figures."""
    label_of = {tuple(setup_dict(st).values()): lbl for lbl, st in sts.items()}
    t = timed.get(label) or next(iter(timed.values()))
    configs = dict(zip(sts, t["configs"], strict=True))
    row = {"dense_best_setup": label_of[tuple(t["against_config"].values())]}
    if label == "dense":
        return row | {
            "latency": {
                st: {"ms": c["against_latency_ms"], "iqr": c["against_latency_iqr_ms"]} for st, c in configs.items()
            },
            "same_setup_ratio": dict.fromkeys(sts, 1.0),
            "best_setup": row["dense_best_setup"],
            "best_ratio": 1.0,
            "best_ratio_iqr": 0.0,
            "times_ms": {st: c["against_times_ms"] for st, c in configs.items()},
            "page_faults": {st: c["against_page_faults"] for st, c in configs.items()},
        }
    return row | {
        "latency": {st: {"ms": c["latency_ms"], "iqr": c["latency_iqr_ms"]} for st, c in configs.items()},
        "same_setup_ratio": {st: c["same_setup_ratio"] for st, c in configs.items()},
        "best_setup": label_of[tuple(t["config"].values())],
        "best_ratio": t["latency_ratio"],
        "best_ratio_iqr": t["latency_ratio_iqr"],
        "best_ratio_halfwidth": t.get("ratio_halfwidth"),
        "reliable": t.get("reliable", True),
        "times_ms": {st: c["times_ms"] for st, c in configs.items()},
        "page_faults": {st: c["page_faults"] for st, c in configs.items()},
    }


#: operator → kind, for the profile's totals: convolutions carry the MACs; the rest is the work pruning
#: shrinks only in part (BN / ReLU on pruned channels) or not at all (residual sums, logits upsampling)
OP_KINDS = {
    "conv": ("convolution",),
    "elementwise": ("add", "mul", "clamp", "relu", "sigmoid", "hardswish", "hardsigmoid", "div", "sub"),
    "resize": ("upsample", "interpolate"),
    "pool": ("pool",),
    "concat/copy": ("cat", "copy", "contiguous", "clone"),
}


def op_kind(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((k for k, keys in OP_KINDS.items() if any(w in name for w in keys)), "other")


def _profiled_forward(net, x) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x)
    return {e.key: e.self_cpu_time_total / 1000.0 for e in prof.key_averages()}


@torch.no_grad()
def profile_pair(dense, pruned, size, a, rounds: int = 6) -> dict[str, dict[str, float]]:
    """Self CPU time per operator (ms per forward), dense and pruned profiled one forward each in turn
    (``rounds`` times, summed then averaged), so drifts hit both alike; the first eager setup named."""
    from mtprune.cost import fold_batchnorm

    st = eager_setup(a)
    fmt = torch.channels_last if st.channels_last else torch.contiguous_format
    nets = [(fold_batchnorm(m) if st.fold_bn else m.eval()).to(memory_format=fmt) for m in (dense, pruned)]
    x = torch.randn(1, 3, *size).to(memory_format=fmt)
    for net in nets:
        net(x)
    out: list[dict[str, float]] = [{}, {}]
    for _ in range(rounds):
        for i, net in enumerate(nets):
            for op, ms in _profiled_forward(net, x).items():
                out[i][op] = out[i].get(op, 0.0) + ms / rounds
    for m in (dense, pruned):
        m.to(memory_format=torch.contiguous_format)
    return {"dense": out[0], "pruned": out[1]}


def by_kind(ops: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for op, ms in ops.items():
        out[op_kind(op)] = out.get(op_kind(op), 0.0) + ms
    return out


def profile_floor(prof: dict[str, dict[str, float]], macs_ratio: float) -> dict[str, float]:
    """The profile's verdict: ``ratio`` (pruned / dense self time), ``conv_ratio`` (the convolutions'),
    ``conv_share`` (the convolutions' part of the dense time) and ``floor`` — the ratio if the
    convolutions had sped up exactly with the MACs and the rest taken the time it took: what no channel
    count can fix."""
    d, p = by_kind(prof["dense"]), by_kind(prof["pruned"])
    td, tp = sum(d.values()), sum(p.values())
    conv_d, conv_p = d.get("conv", 0.0), p.get("conv", 0.0)
    return {
        "ratio": tp / td,
        "conv_ratio": conv_p / conv_d,
        "conv_share": conv_d / td,
        "floor": (macs_ratio * conv_d + tp - conv_p) / td,
    }


def print_profile(prof: dict[str, dict[str, float]], macs_ratio: float, label: str) -> None:
    dense, pruned = prof["dense"], prof["pruned"]
    f = profile_floor(prof, macs_ratio)
    total_d, total_p = sum(dense.values()), sum(pruned.values())
    print(
        f"  profile {label}: total {total_d:.0f} → {total_p:.0f} ms/forward ({f['ratio']:.3f}×, MACs "
        f"{macs_ratio:.3f}×); convolutions {f['conv_ratio']:.3f}× ({100 * f['conv_share']:.1f} % of dense); "
        f"floor if convs shrank with MACs {f['floor']:.3f}"
    )
    d, p = by_kind(dense), by_kind(pruned)
    print(
        "    by kind: "
        + "; ".join(f"{k} {d[k]:.1f} → {p.get(k, 0.0):.1f} ms" for k in sorted(d, key=d.get, reverse=True))
    )
    for op in sorted(dense, key=dense.get, reverse=True)[:12]:
        dm, pm = dense[op], pruned.get(op, 0.0)
        share = 100 * pm / total_p
        print(f"    {op:40s} {dm:9.1f} → {pm:9.1f} ms  ({pm / dm if dm else 0:.3f}×, {share:4.1f} % of pruned)")


def per_layer(nets: dict, size, a) -> dict:
    """Every net's layers timed round-robin (``mtprune.cost.layers.layer_profiles``: one forward of each
    per round, the timing's rounds) in the first eager setup named, each pruned net compared with dense
    layer by layer (``compare_layers``): ``{label: {"total_ms", "dense_total_ms", "ratio", "rows"}}``."""
    models = {label: m for label, (_, m) in nets.items()}
    st = eager_setup(a)
    prof = layer_profiles(
        models, size, device=a.timing.device, channels_last=st.channels_last, fold_bn=st.fold_bn, runs=a.timing.runs
    )
    dense = prof["dense"]
    return {
        label: {
            "total_ms": p.total_ms,
            "dense_total_ms": dense.total_ms,
            "ratio": paired_ratio(p.totals_ms, dense.totals_ms)["ratio"],
            "rows": compare_layers(p, dense),
        }
        for label, p in prof.items()
        if label != "dense"
    }


def print_layer_comparison(layers: dict, label: str, top: int = 10) -> None:
    """Which layers lose: for each layer, its time in the pruned net against what it would take if its time
    shrank with its work (its MACs ratio for convolutions, its output-channel ratio for BN/ReLU …), both
    nets timed in the same rounds; the excess is the difference in ms. Then the totals by layer kind and
    the time outside modules."""
    td, tp = layers["dense_total_ms"], layers["total_ms"]
    print(
        f"  layers {label}: forward with hooks {td:.0f} → {tp:.0f} ms (paired {layers['ratio']:.3f}×); "
        "most time beyond their work:"
    )
    for r in layers["rows"][:top]:
        print(
            f"    {r['name'][:34]:34s} {r['kind'][:22]:22s} {channels_text(r):26s} "
            f"{r['against_ms']:7.2f} → {r['ms']:7.2f} ms (paired × {r['ratio']:.2f} ± {r['ratio_iqr']:.2f}, "
            f"work × {r['work_ratio']:.2f}, {r['excess_ms']:+.2f} ms)"
        )
    kinds = excess_by_kind(layers["rows"])
    print("    by kind: " + "; ".join(f"{k} {d:.0f} → {p:.0f} ms ({e:+.0f})" for k, (d, p, e) in kinds.items()))


def markdown(results: dict) -> str:
    """The rows of one or more runs as a markdown table (``--render`` re-renders saved JSON files)."""
    rows = [r for r in results["rows"] if "best_ratio" in r]
    if not rows:
        return ""
    sts = list(rows[0]["latency"])
    head = ["net", "MACs ×"] + [f"{st} ms (× dense)" for st in sts] + ["fastest", "best × ± IQR", "gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        net = "dense" if r["plan"] == "dense" else f"{r['plan']} {1 - r['ratio']:.2f}×, round-to {r['round_to']}"
        dtype = f" {r['dtype']}" if len({x.get("dtype") for x in rows}) > 1 else ""
        cells = [f"{r['model']}{dtype} {net}", f"{r['macs_ratio']:.3f}"]
        cells += [
            f"{r['latency'][st]['ms']:.0f} ± {r['latency'][st]['iqr']:.0f} ({r['same_setup_ratio'][st]:.3f})"
            for st in sts
        ]
        gap = r["best_ratio"] - r["macs_ratio"]
        cells += [
            r["best_setup"],
            f"{r['best_ratio']:.3f} ± {r['best_ratio_iqr']:.3f}",
            f"{gap:+.3f}" if r["plan"] != "dense" else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_header(script: str, threads: int) -> dict:
    """What every benchmark JSON records first: date, machine, CPU capability, threads, torch, the command,
    the host memory (``mtprune.cost.host_memory``)."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {cpu_model()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "torch": torch.__version__,
        "command": f"python bench/{script} " + " ".join(sys.argv[1:]),
        "host_memory": host_memory(),
    }


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(SIZES))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--plans", nargs="+", default=["uniform", "irregular"], choices=["uniform", "irregular"])
    ap.add_argument("--round-to", nargs="+", type=lambda v: v if v in AUTO else int(v), default=[1, 8, 16],
                    help="multiples K, or auto (mtprune prune --round-to auto, in --runtime)")  # fmt: skip
    ap.add_argument("--runtime", default="best", help="mtprune cost --runtime (default best)")
    ap.add_argument("--timing", nargs="+", default=[], metavar="KEY=VALUE", help="mtprune cost --timing")
    ap.add_argument("--dtypes", nargs="+", default=None, help="several dtypes in turn (default: the timing's)")
    ap.add_argument("--profile", action="store_true", help="per-operator self time, dense against each pruned net")
    ap.add_argument(
        "--per-layer", action="store_true", help="per-layer time against per-layer work, dense against each pruned net"
    )
    ap.add_argument("--skip-timing", action="store_true", help="only --profile / --per-layer, no latency table")
    ap.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), help="input size for every model (default: the paper's)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--coupled",
        default="group",
        choices=["skip", "group"],
        help="for torchvision:/smp: specs and EfficientNet-Lite (default group: MobileNetV3 needs it)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--render", nargs="+", metavar="JSON", help="print the markdown table of saved --json files and exit"
    )
    a = ap.parse_args()
    if a.render:
        for f in a.render:
            with open(f) as fh:
                print(markdown(json.load(fh)) + "\n")
        return
    timing = timing_of(a.runtime, a.timing)
    a.timing = Timing(**{**vars(timing), "threads": timing.threads or 2})
    with timed_as(a.timing):
        results = run(a)
    print("\n" + markdown(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


def run(a: argparse.Namespace) -> dict:
    """Every model's rows (and profiles) as :func:`main` was asked."""
    results = {
        **run_header("latency.py", a.timing.threads),
        "timing": vars(a.timing),
        "device": a.timing.device,
        "device_name": torch.cuda.get_device_name(a.timing.device) if a.timing.device != "cpu" else cpu_model(),
        "onnxruntime": _version("onnxruntime"),
        "sizes": {m: list(a.size) if a.size else list(SIZES.get(m, (512, 512))) for m in a.models},
        "rows": [],
    }
    t = a.timing
    print(f"# {results['date']} {t.device} threads={t.threads} torch {torch.__version__}; paired, {t.runs} rounds")
    print(
        f"{'model':20s} {'dtype':8s} {'net':26s} {'MACs×':>6s} "
        + " ".join(f"{st + ' ms (× dense)':>31s}" for st in setups(a))
        + f"  {'fastest setup':28s} best× (paired) ± IQR"
    )
    for name in a.models:
        size = tuple(a.size) if a.size else SIZES.get(name, (512, 512))
        nets = build_nets(name, a)
        sts = setups(a)
        dmacs = nets["dense"][0]["macs"]
        for dtype in a.dtypes or [a.timing.dtype]:
            timed = {}
            if not a.skip_timing:
                others = {label: m for label, (_, m) in nets.items() if label != "dense"}
                timed = latency_against(others, nets["dense"][1], size, list(sts.values()), t.device, dtype,
                                        t.runs, a.warmup, precision=t.precision)  # fmt: skip
                for label, e in timed.items():  # a busy machine: the rows that are not known to ±precision
                    if (w := timing_warning(e, f"{name} {dtype} {label}'s best-against-best ratio")) is not None:
                        print(w, file=sys.stderr, flush=True)
            for label, (row, _) in nets.items():
                r = {"model": name, "dtype": dtype, **row, "macs_ratio": row["macs"] / dmacs}
                cells = ""
                if timed:
                    r.update(timing_row(label, timed, sts))
                    lat, same = r["latency"], r["same_setup_ratio"]
                    cells = " ".join(f"{lat[st]['ms']:8.1f}±{lat[st]['iqr']:5.1f} ({same[st]:.3f})" for st in sts)
                    cells += f"  {r['best_setup']:28s} {r['best_ratio']:6.3f} ± {r['best_ratio_iqr']:.3f}"
                results["rows"].append(r)
                print(
                    f"{name:20s} {dtype:8s} {label:26s} {r['macs_ratio']:6.3f} {cells}",
                    flush=True,
                )
        dense = nets["dense"][1]
        if a.profile or a.per_layer:
            layers = per_layer(nets, size, a) if a.per_layer else {}
            for label, (row, model) in nets.items():
                if label == "dense":
                    continue
                r = next(
                    x
                    for x in results["rows"]
                    if x["model"] == name
                    and x["plan"] == row["plan"]
                    and x["ratio"] == row["ratio"]
                    and x["round_to"] == row["round_to"]
                )
                if a.profile:
                    r["profile"] = profile_pair(dense, model, size, a)
                    r["profile_floor"] = profile_floor(r["profile"], r["macs_ratio"])
                    print_profile(r["profile"], r["macs_ratio"], label)
                if label in layers:
                    r["layers"] = layers[label]
                    print_layer_comparison(layers[label], label)
        del nets
    return results


if __name__ == "__main__":
    main()
