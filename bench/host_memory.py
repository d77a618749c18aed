"""Host memory against the latency ratio: glibc as a process runs a net, against cached host memory, in one run.

    python bench/host_memory.py [--models pspnet_resnet50 deeplabv3_resnet101] [--variants foldbn compile]
                                [--rounds 32] [--threads 2] [--as-started] [--json FILE]

For each model: the dense net, a uniform 0.5× plan and an irregular one (``bn`` on random γ, round-to 16),
BN folded, channels_last, timed round-robin as ``mtprune cost --against`` times them. The rounds alternate
in pairs between the two host memories, so both see the same machine: ``cached`` inside
:func:`mtprune.cost.host_memory.cached_host_memory`, ``system`` after leaving it (glibc set as its
dynamic thresholds leave a process that has run a net — blocks above 32 MiB mmap'd — and the kept memory
returned). Reports per host memory each net's median time and minor page faults per forward, and the paired
ratios against dense. A process *started* with glibc's defaults can fault more than this ``system``
(its thresholds depend on what it freed before): ``--as-started`` times every round in the host memory the
process was started with (no switching; ``host_memory`` in the JSON says which), to be run in several fresh
processes, with and without ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from latency import SIZES, build_nets, run_header  # bench/latency.py, next to this script
from mtprune.cost.host_memory import CACHED, SYSTEM, cached_host_memory, host_memory, minor_faults
from mtprune.cost.runtimes import compile_settings, inference_net

#: build_nets' labels → the names this benchmark prints
NAMES = {"dense": "dense", "uniform 0.5 rt16": "uniform 0.5×", "irregular 0.5 rt16": "irregular 0.5×, round-to 16"}


def nets(name: str, size: tuple[int, int]) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """The dense net and the two 0.5× plans (uniform; irregular = ``bn`` on random γ, round-to 16) as
    ``bench/latency.py`` builds them, and each net's MACs as a fraction of dense's."""
    a = argparse.Namespace(size=list(size), plans=["uniform", "irregular"], ratios=[0.5], round_to=[16])
    built = build_nets(name, a)
    dmacs = built["dense"][0]["macs"]
    return {NAMES[k]: m for k, (_, m) in built.items()}, {NAMES[k]: r["macs"] / dmacs for k, (r, _) in built.items()}


@torch.no_grad()
def ab(
    models: dict[str, torch.nn.Module], size: tuple[int, int], compile: bool, rounds: int, switch: bool = True
) -> dict:
    """Times and faults per host memory, rounds alternating in pairs (one untimed forward after each switch);
    ``switch=False``: every round in the process's own host memory (reported under its name)."""
    x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
    modes = (SYSTEM, CACHED) if switch else (host_memory(),)
    times = {hm: {k: [] for k in models} for hm in modes}
    faults = {hm: {k: [] for k in models} for hm in modes}
    with compile_settings(len(models)):
        run = {k: inference_net(m, "cpu", True, True, compile) for k, m in models.items()}
        for f in run.values():
            for _ in range(3):
                f(x)
        for r in range(0, rounds, 2):
            hm = (SYSTEM, CACHED)[(r // 2) % 2] if switch else host_memory()
            with cached_host_memory() if hm == CACHED and switch else contextlib.nullcontext():
                next(iter(run.values()))(x)
                for i in range(2):
                    for k in list(run) if (r + i) % 2 == 0 else list(reversed(run)):
                        f0, t0 = minor_faults(), time.perf_counter()
                        run[k](x)
                        times[hm][k].append((time.perf_counter() - t0) * 1e3)
                        faults[hm][k].append(minor_faults() - f0)
    out = {}
    for hm in modes:
        d = times[hm]["dense"]
        out[hm] = {
            k: {
                "ms": statistics.median(v),
                "page_faults": int(statistics.median(faults[hm][k])),
                "ratio": statistics.median([a / b for a, b in zip(v, d, strict=True)]),
            }
            for k, v in times[hm].items()
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["pspnet_resnet50", "deeplabv3_resnet101"], choices=list(SIZES))
    ap.add_argument("--variants", nargs="+", default=["foldbn", "compile"], choices=["foldbn", "compile"])
    ap.add_argument("--size", nargs=2, type=int, default=[513, 513], metavar=("H", "W"))
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--as-started", action="store_true", help="no switching: the host memory the process has")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.rounds < 20:
        ap.error(f"--rounds must be at least 20 (got {a.rounds})")
    torch.set_num_threads(a.threads)
    size = (a.size[0], a.size[1])
    results = {**run_header("host_memory.py", a.threads), "rows": []}
    modes = [host_memory()] if a.as_started else [SYSTEM, CACHED]
    print("| model | variant | net | MACs × | " + " | ".join(f"{hm} ms (faults) | × dense" for hm in modes) + " |")
    print("|---|---|---|---|" + "---|---|" * len(modes))
    for name in a.models:
        models, macs = nets(name, size)
        for v in a.variants:
            r = ab(models, size, v == "compile", a.rounds, switch=not a.as_started)
            results["rows"].append({"model": name, "variant": v, "macs_ratio": macs, **r})
            for k in models:
                c = [r[hm][k] for hm in r]
                cells = " | ".join(f"{x['ms']:.0f} ({x['page_faults']}) | {x['ratio']:.3f}" for x in c)
                print(f"| {name} | {v} | {k} | {macs[k]:.3f} | {cells} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
