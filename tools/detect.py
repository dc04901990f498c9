"""Downstream: instance segmentation with a pre-trained encoder (the paper's Tables 2 and 3).

    python -m tools.detect runs/loco/ckpt.pt --train-scenes 1000 --split 0       # like COCO-10K
    python -m tools.detect runs/loco/ckpt.pt --train-scenes 100 --split 2        # like COCO-1K
    python -m tools.detect random --like runs/loco/ckpt.pt --train-scenes 100    # the random-init row
    python -m tools.detect runs/loco/ckpt.pt --coco-train IMAGES_DIR ANNOTATIONS.json \\
        --coco-val IMAGES_DIR ANNOTATIONS.json                              # real COCO

A checkpoint of train.py becomes the backbone of torchvision's Mask R-CNN: its stages, then a
feature pyramid (FPN) over every stage's output. As in the paper (Sec. 5.2-5.3, following MoCo):
BatchNorm after every newly added layer (FPN, a 4conv-1fc box head and the mask head: torchvision's
Mask R-CNN v2 heads), the encoder fine-tuned with its BatchNorm in train mode (one process: the
paper's SyncBN is plain BatchNorm), except its lowest stage (conv1 + res2), which stays frozen,
BatchNorm included (running statistics, FrozenBatchNorm2d). The random-init row trains everything
from scratch, nothing frozen.

Data: without a download, scenes of 2-4 shapes drawn by shapes.make_scenes (64 x 64, a box, a
class and a mask per object, ten classes); --train-scenes N takes the first N scenes of split K
(an independent random draw per split), and every run is scored on the same 200 validation
scenes. With --coco-train / --coco-val, a COCO-format dataset instead (images and an annotation
JSON: boxes, categories and polygon or RLE masks).

Scores: COCO's own evaluation (pycocotools): box and mask AP, AP50, AP75. Writes
detect_<init>_<scenes>_<split>.json into --out.
"""

import argparse
import contextlib
import io
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cli
import data
import model
import recipe
import runtime
import shapes
from cli import UserError

VAL = 200                        # synthetic validation scenes, the same for every run


# ---------------------------------------------------------------------------- the detector
def detector(encoder: model.StagedEncoder, num_classes: int, size: int, freeze_lowest: bool,
             mean: tuple, std: tuple, fpn: int = 32, small: bool = True) -> MaskRCNN:
    """torchvision's Mask R-CNN on the encoder's stages with an FPN over all of them; the image
    size is the images' own (no resizing). small: a CPU-sized detector for the synthetic scenes
    (at most 4 objects: 32 sampled RoIs and 20 detections per image, fewer proposals, one conv in
    the RPN head); without it, COCO's numbers (512 RoIs, 100 detections, 2000/1000 proposals)."""
    sizes = dict(rpn_batch_size_per_image=64, box_batch_size_per_image=32,
                 box_detections_per_img=20, rpn_pre_nms_top_n_train=600,
                 rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                 rpn_post_nms_top_n_test=100) if small else {}
    if freeze_lowest:
        stage = encoder.stages[0].requires_grad_(False)
        for name, m in list(stage.named_modules()):   # running statistics, never updated
            if isinstance(m, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(m.num_features, m.eps)
                frozen.load_state_dict({k: v for k, v in m.state_dict().items()
                                        if k != "num_batches_tracked"})
                parent, _, leaf = name.rpartition(".")
                setattr(stage.get_submodule(parent) if parent else stage, leaf, frozen)
    levels = len(encoder.stages)
    backbone = BackboneWithFPN(encoder.stages, {str(k): str(k) for k in range(levels)},
                               encoder.channels, fpn, LastLevelMaxPool(), nn.BatchNorm2d)
    anchors = AnchorGenerator(tuple((8 * 2 ** k,) for k in range(levels + 1)),
                              ((0.5, 1.0, 2.0),) * (levels + 1))
    names = [str(k) for k in range(levels)]
    return MaskRCNN(
        backbone, None, min_size=size, max_size=size, image_mean=list(mean),
        image_std=list(std), rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn, anchors.num_anchors_per_location()[0], conv_depth=1 if small else 2),
        **sizes,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2), mask_roi_pool=MultiScaleRoIAlign(names, 14, 2),
        box_head=FastRCNNConvFCHead((fpn, 7, 7), [fpn] * 4, [4 * fpn], nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(4 * fpn, num_classes),
        mask_head=MaskRCNNHeads(fpn, [fpn] * 4, 1, nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(fpn, fpn, num_classes))


# ---------------------------------------------------------------------------- data
def synthetic_split(scenes: int, split: int) -> tuple[torch.Tensor, list[dict]]:
    """Split `split`: `scenes` scenes drawn from seed 1000 + split. Splits are independent draws;
    the first 100 scenes of a split are its 100-scene version (as COCO-1K within COCO-10K)."""
    return shapes.make_scenes(scenes, seed=1000 + split)


def coco_dataset(images_dir: str, annotations: str) -> tuple[list[torch.Tensor], list[dict], COCO]:
    """A COCO-format dataset: uint8 images (3, H, W), targets as torchvision wants them (boxes
    x1 y1 x2 y2, labels 1..C by category order, masks), and the COCO object of its annotations."""
    from PIL import Image
    path = Path(annotations)
    if not path.is_file():
        raise UserError(f"{path}: no such annotation file")
    try:
        dataset = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({str(e)[:60]})")
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(dataset, dict) or not isinstance(dataset.get(k), list)]
    if missing:
        raise UserError(f"{path} is not a COCO annotation file: no list of {', '.join(missing)}")
    if not dataset["images"] or not dataset["categories"]:
        raise UserError(f"{path} holds {len(dataset['images'])} images and "
                        f"{len(dataset['categories'])} categories: a COCO split needs both")
    if not dataset["annotations"]:
        raise UserError(f"{path} holds no annotations: nothing to train on nor to score; give a "
                        f"split whose images have annotated objects")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a COCO annotation file ({type(e).__name__}: {e})")
    cats = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    images, targets = [], []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        with Image.open(Path(images_dir) / info["file_name"]) as im:
            images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns]).view(-1, 4).float()
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        targets.append({"boxes": boxes, "labels": torch.tensor([cats[a["category_id"]] for a in anns],
                                                               dtype=torch.int64), "masks": masks,
                        "image_id": image_id})
    return images, targets, coco


def coco_ground_truth(targets: list[dict], size: tuple[int, int]) -> COCO:
    """In-memory COCO ground truth of targets (image ids 0..n-1, categories 1..10)."""
    anns = []
    for i, t in enumerate(targets):
        for box, label, mask in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            rle = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                         "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
    with contextlib.redirect_stdout(io.StringIO()):     # pycocotools prints as it goes
        coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": size[0], "width": size[1]}
                               for i in range(len(targets))],
                    "categories": [{"id": c} for c in range(1, len(shapes.SHAPES) + 1)],
                    "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# ---------------------------------------------------------------------------- evaluation
def coco_scores(gt: COCO, detections: list[dict]) -> dict[str, float]:
    """Box and mask AP, AP50, AP75 (in %) of detections (COCO result format: image_id,
    category_id, bbox x y w h, score, segmentation RLE). No detection at all scores 0; where
    COCO finds nothing to score (no ground truth: its -1) the value is None, never 0, and
    tables show it as n/a."""
    out = {}
    if not gt.getAnnIds(imgIds=sorted(gt.getImgIds())):
        print("nothing to score: the validation images hold no ground-truth object (AP: null)")
        return {f"{kind}_{k}": None for kind in ("bbox", "segm") for k in ("AP", "AP50", "AP75")}
    for kind in ("bbox", "segm"):
        if not detections:
            out.update({f"{kind}_{k}": 0.0 for k in ("AP", "AP50", "AP75")})
            continue
        # pycocotools prints as it goes, and warns of numpy 2's copy keyword on every mask
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
            evaluation = COCOeval(gt, gt.loadRes(detections), kind)
            evaluation.params.imgIds = sorted(gt.getImgIds())
            evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
        ap, ap50, ap75 = (100 * float(v) if v >= 0 else None for v in evaluation.stats[:3])
        out.update({f"{kind}_AP": ap, f"{kind}_AP50": ap50, f"{kind}_AP75": ap75})
    return out


def as_detections(outputs: list[dict], image_ids: list[int]) -> list[dict]:
    """Mask R-CNN's outputs as COCO results: masks binarised at 0.5, run-length encoded."""
    results = []
    for image_id, o in zip(image_ids, outputs):
        for box, label, score, mask in zip(o["boxes"].tolist(), o["labels"].tolist(),
                                           o["scores"].tolist(), o["masks"]):
            rle = coco_mask.encode(np.asfortranarray((mask[0] >= 0.5).numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": label, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "segmentation": rle})
    return results


@torch.no_grad()
def evaluate(net: MaskRCNN, images: list[torch.Tensor], gt: COCO, image_ids: list[int],
             batch: int = 16) -> dict[str, float]:
    net.eval()
    outputs, device = [], next(net.parameters()).device
    for i in range(0, len(images), batch):
        outputs += [{k: v.cpu() for k, v in o.items()}
                    for o in net([x.to(device).float() / 255 for x in images[i:i + batch]])]
    return coco_scores(gt, as_detections(outputs, image_ids))


# ---------------------------------------------------------------------------- training
def fine_tune(net: MaskRCNN, images: list[torch.Tensor], targets: list[dict], iterations: int,
              batch: int, lr: float, seed: int, log_every: int = 50) -> list[float]:
    """SGD (momentum 0.9, weight decay 1e-4), linear warm-up over the first 10% of iterations,
    then x0.1 at 2/3 and 8/9 of them (Detectron's 1x shape); random horizontal flips."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, iterations // 10)
    losses, t0 = [], time.time()
    net.train()
    for it in range(iterations):
        scale = min(1.0, (it + 1) / warmup) * (0.1 ** sum(it >= f * iterations for f in (2 / 3, 8 / 9)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(len(images), (batch,), generator=g).tolist()
        flip = torch.rand(batch, generator=g) < 0.5
        xs, ts = [], []
        for i, f in zip(idx, flip.tolist()):
            device = next(net.parameters()).device
            x = images[i].to(device).float() / 255
            t = {k: v.to(device) if torch.is_tensor(v) else v for k, v in targets[i].items()}
            if f:
                w = x.shape[-1]
                x, t["masks"] = x.flip(-1), t["masks"].flip(-1)
                t["boxes"] = torch.stack([w - t["boxes"][:, 2], t["boxes"][:, 1],
                                          w - t["boxes"][:, 0], t["boxes"][:, 3]], 1)
            xs.append(x), ts.append({k: v for k, v in t.items() if k != "image_id"})
        loss = sum(net(xs, ts).values())
        if not math.isfinite(loss.item()):
            raise UserError(f"the detection loss became NaN or infinite at iteration {it}: "
                            f"lower --lr", flag=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (it + 1) % log_every == 0 or it + 1 == iterations:
            print(f"iteration {it + 1}/{iterations} | loss {np.mean(losses[-log_every:]):.3f} | "
                  f"lr {lr * scale:.3g} | {(it + 1) * batch / (time.time() - t0):.1f} img/s",
                  flush=True)
    return losses


# ---------------------------------------------------------------------------- the command
def refuse_overwrite(path: Path, source: str) -> None:
    """A result is named by method, scenes and split: never replace one that another checkpoint
    wrote (running the same one again replaces its own)."""
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
        theirs = before.get("checkpoint") or before.get("like")
    except (ValueError, UnicodeDecodeError, AttributeError):
        theirs = "a file that is not a detect.py result"
    if theirs != source:
        raise UserError(f"{path} holds the result of {theirs}, not {source}: give another --out",
                        flag=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__, "python -m tools.detect")
    p.add_argument("init", help="a ckpt.pt written by train.py, or 'random' (with --like)")
    p.add_argument("--like", default=None, help="random: the checkpoint whose encoder "
                   "(architecture, width, stem) to build untrained")
    p.add_argument("--train-scenes", type=cli.positive(int), default=1000,
                   help="labelled training scenes (synthetic)")
    p.add_argument("--split", type=cli.at_least_zero(int), default=0, help="which random split")
    p.add_argument("--coco-train", nargs=2, metavar=("IMAGES", "JSON"), default=None)
    p.add_argument("--coco-val", nargs=2, metavar=("IMAGES", "JSON"), default=None)
    p.add_argument("--iterations", type=cli.positive(int), default=None,
                   help="default: 240 with 1,000 scenes or more, else 120 (the paper: 4x as many "
                        "on COCO-10K as on COCO-1K; here a CPU's share)")
    p.add_argument("--batch", type=cli.positive(int), default=8)
    p.add_argument("--lr", type=cli.positive(float), default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fpn", type=cli.positive(int), default=None,
                   help="FPN and head channels; default: 256 on COCO (the paper's), 32 on the "
                        "synthetic scenes")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--out", default="runs/detect", help="directory for the result JSON")
    args = p.parse_args(argv)
    if args.init == "random" and not args.like:
        p.error("init 'random' needs --like CKPT: the encoder to build untrained")
    if bool(args.coco_train) != bool(args.coco_val):
        p.error("give both --coco-train and --coco-val, or neither")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = cli.check_writable(args.out, "--out", is_dir=True)
    random_init = args.init == "random"
    rt = runtime.setup(args.device, "fp32")   # float32: torchvision's detection heads, as tested
    torch.manual_seed(args.seed)
    encoder, ckpt = recipe.load_encoder(args.like if random_init else args.init,
                                        torch.device("cpu"), random_init)
    encoder.train().requires_grad_(True)
    info = data.DATASETS[ckpt["config"]["dataset"]]
    if args.coco_train:
        train_x, train_t, _ = coco_dataset(*args.coco_train)
        val_x, val_t, val_gt = coco_dataset(*args.coco_val)
        val_ids = [t["image_id"] for t in val_t]
        classes, name = len(val_gt.getCatIds()) + 1, "coco"
        size = max(max(x.shape[-2:]) for x in train_x)
    else:
        train_x, train_t = synthetic_split(args.train_scenes, args.split)
        val_x, val_t = shapes.make_scenes(VAL, seed=99)
        val_gt, val_ids = coco_ground_truth(val_t, val_x.shape[-2:]), list(range(VAL))
        classes, name, size = len(shapes.SHAPES) + 1, f"{args.train_scenes}", val_x.shape[-1]
        train_x, val_x = list(train_x), list(val_x)
    init = "random" if random_init else ckpt["config"]["method"]
    source = cli.portable(args.like if random_init else args.init)
    path = out / f"detect_{init}_{name}_{args.split}.json"
    refuse_overwrite(path, source)
    net = detector(encoder, classes, size, not random_init, info.mean, info.std,
                   fpn=args.fpn or (256 if args.coco_train else 32),
                   small=not args.coco_train).to(rt.device)
    iterations = args.iterations or (240 if len(train_x) >= 1000 else 120)
    t = time.time()
    losses = fine_tune(net, train_x, train_t, iterations, args.batch, args.lr, args.seed)
    print(f"evaluating on {len(val_x)} images", flush=True)
    scores = evaluate(net, val_x, val_gt, val_ids)
    result = {"init": init, "checkpoint": None if random_init else source,
              "like": source if random_init else None,
              "train_scenes": len(train_x), "split": args.split, "iterations": iterations,
              "minutes": round((time.time() - t) / 60, 2), "final_loss": float(np.mean(losses[-20:])),
              **{k: None if v is None else round(v, 2) for k, v in scores.items()},
              "args": {**vars(args), "out": cli.portable(args.out)},
              "provenance": runtime.provenance(rt)}
    print(f"{init}, {len(train_x)} training scenes, split {args.split}: "
          + " ".join(f"{k} {'n/a' if v is None else f'{v:.1f}'}" for k, v in scores.items()))
    cli.write_atomic(path, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.run(main, "python -m tools.detect")
