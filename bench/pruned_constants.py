"""What removing a sparse stage's switched-off channels costs, and why (issue 28's finding).

A channel whose BN scale γ the ℓ1 term drove to 0 still outputs a constant, act(β); the next layers were trained
with it. Physical pruning (and ``mask_plan``, its reference) removes the channel *and* that constant. This script
evaluates a sparse stage's net three ways for one prune plan of a run: as it is; with the plan's channels' γ set
to 0 (their BN and depthwise followers' — what they nearly are); with γ and β set to 0 (what pruning computes).
Also the |γ| and |β| of the removed channels' scored BNs.

    python bench/pruned_constants.py runs/effnet/seed-0 mtp-macs0.75-independent --config configs/camvid_effnet.yaml
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run (seed) folder")
    ap.add_argument("tag", help="the variant whose prune plan to apply, e.g. mtp-macs0.75-independent")
    ap.add_argument("--config", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from mtprune import load_model
    from mtprune.config import load_config
    from mtprune.evaluate.validation import final_metrics
    from mtprune.io import read_json, write_json
    from mtprune.layout import prune_dir, source_dir
    from mtprune.pruning.plan import PruningPlan
    from mtprune.train.distributed import setup

    cfg, env = load_config(args.config), setup("cpu")
    method = args.tag.split("-")[0]
    src = load_model(args.run / source_dir(method))
    plan = PruningPlan.from_dict(read_json(args.run / prune_dir(args.tag) / "plan.json"))
    layers = {lay.conv: lay for lay in src.prunable_layers()}
    result: dict[str, Any] = {"run": str(args.run), "tag": args.tag}
    gammas, betas = [], []
    for mode in ("as_trained", "gamma_zero", "gamma_beta_zero"):
        model = copy.deepcopy(src)
        with torch.no_grad():
            for name, lp in plan.layers.items():
                drop = sorted(set(range(lp.channels)) - set(lp.kept))
                bn = model.get_submodule(layers[name].bn)
                if mode == "as_trained":
                    gammas += bn.weight[drop].abs().tolist()
                    betas += bn.bias[drop].abs().tolist()
                for bn_name in layers[name].all_bns if mode != "as_trained" else ():
                    m = model.get_submodule(bn_name)
                    m.weight[drop] = 0.0
                    if mode == "gamma_beta_zero":
                        m.bias[drop] = 0.0
        r = final_metrics(model, cfg, env, ("seg", "cls"), True)
        result[mode] = {"miou": r["miou"], "top1": r.get("top1")}
        print(mode, json.dumps(result[mode]), flush=True)
    result["removed"] = {
        "channels": len(gammas),
        "median_abs_gamma": statistics.median(gammas),
        "max_abs_gamma": max(gammas),
        "median_abs_beta": statistics.median(betas),
    }
    print("removed", json.dumps(result["removed"]))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
