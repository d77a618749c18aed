"""Mobile-class nets, dense against 0.5× MACs, runtime by runtime and layer by layer (issue 32).

For each net (default: ``torchvision:lraspp_mobilenet_v3_large``, ``torchvision:deeplabv3_mobilenet_v3_large``
and ``deeplabv3_efficientnet_lite0``, all with ``--coupled group``): a dense net with irregular γ (U(0, 1), seed 1:
the uneven channel counts a sparse stage leaves; no trained weights are needed for timing), pruned by ``bn`` to
``--target macs=0.5`` at each ``--round-to`` (``auto`` timed in the ``--runtime`` best setup's table) and to each
``--latency-targets`` X (``--target latency=X --runtime best --round-to auto``: re-measured, does it land within
0.03 of X?), then for each runtime ``mtprune cost --checkpoint PRUNED --against DENSE --latency --per-layer
--runtime R --json`` — both nets timed in the same paired rounds; eager runtimes layer by layer too. Everything
through the CLI a user has.

    python bench/mobile.py --out runs/mobile [--nets …] [--size 512 512] [--round-to 1 auto]
        [--runtimes eager channels-last+fold-bn compile onnxruntime best] [--runs 20] [--threads 2] [--json FILE]
        [--prune-runtime best]
    python bench/mobile.py --render FILE        # the tables of a saved --json

AVX2 code paths on an AVX-512 machine (PyTorch's setups only: ONNX Runtime cannot be capped)::

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/mobile.py --out runs/mobile-avx2 \
        --runtimes compile eager,channels-last,fold-bn,channels-last+fold-bn \
        --prune-runtime eager,channels-last,fold-bn,channels-last+fold-bn

Writes the dense and pruned checkpoints under ``--out`` (reused when there: rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NETS = [
    "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:deeplabv3_mobilenet_v3_large",
    "deeplabv3_efficientnet_lite0",
]
RUNTIMES = ["eager", "channels-last+fold-bn", "compile", "onnxruntime", "best"]
#: environment variables that make PyTorch run a lesser CPU's code paths (ATen's kernels and torch.compile's code:
#: ``ATEN_CPU_CAPABILITY=avx2``; oneDNN's convs: ``ONEDNN_MAX_CPU_ISA=AVX2``); ONNX Runtime has no such switch
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def _cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "mtprune", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _dense(net: str, folder: Path, classes: int) -> Path:
    """The dense net with irregular γ, saved once."""
    import torch

    from mtprune import build_model, save_model

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    model = build_model(net, classes, coupled="group")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g))
    save_model(model, folder)
    return folder


def _prune(dense: Path, out: Path, size: list[int], round_to: str, runtime: str, threads: int,
           target: str = "macs=0.5") -> Path:  # fmt: skip
    if not (out / "model.safetensors").is_file():
        args = ["prune", "--checkpoint", str(dense), "--method", "bn", "--target", target, "--round-to", round_to]
        args += ["--size", *map(str, size), "--out", str(out)]
        if round_to == "auto" or target.startswith("latency"):
            args += ["--runtime", runtime, "--timing", f"threads={threads}"]
        subprocess.run([sys.executable, "-m", "mtprune", *args], check=True)
    return out


def machine(a: argparse.Namespace) -> dict[str, Any]:
    """What a result was measured on and how: date, CPU model and capability, torch, size, rounds, threads."""
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ},  # code paths capped below the CPU's
        "torch": torch.__version__,
        "size": a.size,
        "runs": a.runs,
        "threads": a.threads,
    }


def run(a: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {**machine(a), "rows": []}
    for net in a.nets:
        slug = net.replace(":", "_")
        dense = _dense(net, a.out / slug / "dense", a.classes)
        for rt in a.round_to:
            pruned = _prune(dense, a.out / slug / f"rt{rt}", a.size, rt, a.prune_runtime, a.threads)
            for runtime in a.runtimes:
                args = ["cost", "--checkpoint", str(pruned), "--against", str(dense), "--size", *map(str, a.size)]
                args += ["--latency", "--runtime", runtime, "--timing", f"runs={a.runs}", f"threads={a.threads}"]
                per_layer = runtime in ("eager", "channels-last", "fold-bn", "channels-last+fold-bn")
                c = _cli(*args, *(["--per-layer"] if per_layer else []), "--json")
                row = {"net": net, "round_to": rt, "runtime": runtime, "cost": c}
                result["rows"].append(row)
                print(_line(row), flush=True)
                if a.json:
                    _write(a.json, result)
        for x in a.latency_targets:  # item 3: does --target latency=X land within 0.03 of X, re-measured?
            where = a.out / slug / f"latency{x}-rt{a.latency_round_to}"
            pruned = _prune(dense, where, a.size, a.latency_round_to, a.prune_runtime, a.threads, f"latency={x}")
            args = ["cost", "--checkpoint", str(pruned), "--against", str(dense), "--size", *map(str, a.size)]
            args += ["--latency", "--runtime", a.prune_runtime, "--json"]
            args += ["--timing", f"runs={a.runs}", f"threads={a.threads}"]
            plan = json.loads((pruned / "plan.json").read_text())
            row = {"net": net, "round_to": f"latency={x}/{a.latency_round_to}", "runtime": a.prune_runtime}
            row["cost"] = _cli(*args)
            row["target"] = {"latency": x, "reached_when_pruned": plan.get("target", {}).get("reached")}
            result["rows"].append(row)
            print(_line(row), f"target {x}: re-measured {row['cost']['latency_ratio']:.3f}", flush=True)
            if a.json:
                _write(a.json, result)
    return result


def _line(row: dict[str, Any]) -> str:
    c = row["cost"]
    lat = c.get("latency_ratio")
    return (
        f"{row['net']:42s} rt{row['round_to']:5s} {row['runtime']:22s} MACs× {c['macs_ratio']:.3f} "
        f"latency× {lat:.3f} ± {c.get('ratio_halfwidth', float('nan')):.3f} gap {lat - c['macs_ratio']:+.3f} "
        f"({c.get('against_latency_ms', float('nan')):.1f} → {c.get('latency_ms', float('nan')):.1f} ms)"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _write(path: str, result: dict[str, Any]) -> None:
    from mtprune.io import write_json

    write_json(path, result)


def _caps(result: dict[str, Any]) -> str:
    caps = result.get("isa_caps") or {}
    return f" (capped: {', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else ""


def render(result: dict[str, Any]) -> str:
    """The gap table, then each eager profile's layers that lose most."""
    lines = [
        f"{result['date']}, {result['cpu']}, capability {result['capability']}{_caps(result)}, "
        f"torch {result['torch']}, "
        f"{result['threads']} threads, {result['size'][0]}×{result['size'][1]}, {result['runs']} paired rounds",
        "",
        "| net | round-to | runtime | MACs × | dense → pruned ms | latency × ± | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r["cost"]
        lat = c["latency_ratio"]
        setup = f" ({c['config']['setup']} vs {c['against_config']['setup']})" if "config" in c else ""
        lines.append(
            f"| {r['net']} | {r['round_to']} | {r['runtime']}{setup} | {c['macs_ratio']:.3f} | "
            f"{c['against_latency_ms']:.1f} → {c['latency_ms']:.1f} | {lat:.3f} ± "
            f"{c.get('ratio_halfwidth', float('nan')):.3f} | {lat - c['macs_ratio']:+.3f} |"
        )
    for r in result["rows"]:
        if "layers" not in r["cost"]:
            continue
        lines += ["", f"{r['net']} rt{r['round_to']} {r['runtime']}: layers whose time shrinks least (excess ms)"]
        for x in r["cost"]["layers"][:8]:
            lines.append(
                f"- {x['name']} ({x['kind']}): {x['against_ms']:.2f} → {x['ms']:.2f} ms, × {x['ratio']:.2f} for work "
                f"× {x['work_ratio']:.2f} ({x['excess_ms']:+.2f} ms)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mobile"))
    ap.add_argument("--nets", nargs="+", default=NETS)
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--size", nargs=2, type=int, default=[512, 512])
    ap.add_argument("--round-to", nargs="+", default=["1", "auto"])
    ap.add_argument("--runtimes", nargs="+", default=RUNTIMES)
    ap.add_argument("--latency-targets", nargs="*", type=float, default=[0.75], help="prune --target latency=X")
    ap.add_argument("--latency-round-to", default="auto", help="the latency targets' --round-to (default: auto)")
    ap.add_argument("--prune-runtime", default="best", help="prune's --runtime for auto and latency targets (best)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None, metavar="JSON")
    a = ap.parse_args(argv)
    if a.render:
        print(render(json.loads(Path(a.render).read_text())))
        return 0
    print(render(run(a)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
