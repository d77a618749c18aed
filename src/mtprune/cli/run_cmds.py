"""``mtprune run CONFIG --out DIR`` and ``mtprune demo``: Algorithm 1 end to end with a comparison report."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from mtprune.config import load_config
from mtprune.layout import DENSE, PLOTS_DIR, REPORT_FILE, RESULTS_FILE, display_name
from mtprune.pipeline import run_command
from mtprune.report.seeds import render_seeds


def demo_config_path() -> Path:
    return Path(str(resources.files("mtprune") / "configs" / "demo.yaml"))


def _print_table(rows: list[dict], out: Path) -> None:
    timed = any(r.get("latency_setup") for r in rows)
    head = f"{'model':36s} {'mIoU %':>8s} {'Δ':>7s} {'params':>8s} {'MACs':>7s} {'latency':>8s} {'top-1 %':>8s}"
    print("\n" + head + ("  latency setup" if timed else ""))

    def f(x: float | None, fmt: str, scale: float = 1.0) -> str:
        return format(scale * x, fmt) if x is not None else "–"

    for r in rows:
        delta = "" if r["method"] == DENSE else f(r["delta_miou"], "+.2f", 100)
        print(
            f"{display_name(r):36s} {f(r['miou'], '.2f', 100):>8s} {delta:>7s} "
            f"{f(r['params_ratio'], '.2f'):>7s}× {f(r['macs_ratio'], '.2f'):>6s}× {f(r['latency_ratio'], '.2f'):>7s}× "
            f"{f(r['top1'], '.1f', 100):>8s}" + (f"  {r.get('latency_setup') or '–'}" if timed else "")
        )
    size = next((r["latency_size"] for r in rows if r.get("latency_size")), None)
    if size:
        print(
            f"latency: batch 1 at {size[0]}×{size[1]}, each net in its fastest of run.timing's runtimes (setup "
            "column), paired per round with dense"
        )
    print(f"\nresults: {out / RESULTS_FILE}\nreport:  {out / REPORT_FILE}\nplots:   {out / PLOTS_DIR}/")


def _execute(
    cfg_path: str | Path | None,
    sets: list[str],
    out: str,
    banner: str | None = None,
    seeds: list[int] | None = None,
    jobs: int = 1,
) -> int:
    cfg = load_config(cfg_path, sets)
    if banner:
        print(banner)
    t0 = time.time()
    result = run_command(cfg, out, seeds=seeds, jobs=jobs)
    if isinstance(result, dict):  # several seeds: their summary
        print("\n" + render_seeds(result))
        print(f"summary: {Path(out) / 'summary.md'} (and summary.json); each seed in {Path(out)}/seed-<k>/")
    else:
        _print_table(result, Path(out))
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def _skip_bad(args: argparse.Namespace) -> list[str]:
    return ["data.skip_bad=true"] if getattr(args, "skip_bad", False) else []


def _run(args: argparse.Namespace) -> int:
    return _execute(args.config, args.set + _skip_bad(args), args.out, seeds=args.seeds, jobs=args.jobs)


def _demo(args: argparse.Namespace) -> int:
    sets = list(args.set) + ([f"seed={args.seed}"] if args.seed is not None else [])
    banner = (
        f"mtprune demo: MTP, Network Slimming and Uniform at 0.5× on synthetic data, in {args.out} "
        "(rerun the same command to resume after Ctrl-C)"
    )
    return _execute(demo_config_path(), sets, args.out, banner)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="Algorithm 1 end to end for every configured method (resumable), with a report")
    p.add_argument("config", metavar="CONFIG", help="YAML config with a 'run' section (see configs/)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (rerun to resume; finished stages reused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable or invalid samples")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="K",
        help="one run per seed in DIR/seed-K, pre-training shared, then DIR/summary.md: mean ± std and paired "
        "per-seed differences (MTP − Slimming …)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="with --seeds: N seeds at once, each a process with 1/N of the threads, its output in "
        "DIR/seed-K/run.log; latency timed after, one seed at a time (default 1)",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser("demo", help="the whole pipeline on embedded synthetic data in a few minutes on a CPU")
    p.add_argument("--out", default="mtprune-demo", metavar="DIR", help="run folder (default ./mtprune-demo)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=_demo)
