"""detect.py: the COCO scores against known answers, the frozen stage, and one training iteration
end to end, on synthetic scenes and through the COCO-format reader."""

import json

import numpy as np
import pytest
import torch

from tools import detect, experiments
import shapes


@pytest.fixture(scope="module")
def scenes():
    return shapes.make_scenes(6, seed=3)


def test_scenes_have_a_box_a_class_and_a_whole_mask_per_object(scenes):
    images, targets = scenes
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    again = shapes.make_scenes(6, seed=3)
    assert torch.equal(images, again[0])
    for t in targets:
        assert 2 <= len(t["labels"]) <= 4 and t["labels"].min() >= 1 and t["labels"].max() <= 10
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = mask.nonzero(as_tuple=True)           # the box is the mask's extent
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert t["masks"].sum(0).max() <= 1                 # no object hides another


def perfect(targets):
    return [{"image_id": i, "category_id": label, "score": 1.0,
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "segmentation": {**r, "counts": r["counts"].decode()}}
            for i, t in enumerate(targets)
            for b, label, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"])
            for r in [detect.coco_mask.encode(np.asfortranarray(m.numpy().astype(np.uint8)))]]


def test_perfect_predictions_score_ap_100_and_none_score_0(scenes):
    images, targets = scenes
    gt = detect.coco_ground_truth(targets, images.shape[-2:])
    scores = detect.coco_scores(gt, perfect(targets))
    assert all(v == pytest.approx(100.0) for v in scores.values()), scores
    shifted = perfect(targets)
    for d in shifted:                                   # every box moved by its own width
        d["bbox"][0] += d["bbox"][2]
    assert detect.coco_scores(gt, shifted)["bbox_AP"] < 1
    assert detect.coco_scores(gt, []) == {f"{k}_{m}": 0.0 for k in ("bbox", "segm")
                                          for m in ("AP", "AP50", "AP75")}


def test_nothing_to_score_is_none_not_zero(scenes):
    """COCO's -1 (no ground truth of that kind to score) is not an AP of 0: it is written as
    None, and the tables show n/a."""
    images, targets = scenes
    empty = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0], "masks": t["masks"][:0]}
             for t in targets]
    gt = detect.coco_ground_truth(empty, images.shape[-2:])
    scores = detect.coco_scores(gt, perfect(targets))
    assert all(v is None for v in scores.values()), scores
    assert all(v is None for v in detect.coco_scores(gt, []).values())  # nor when none is found
    assert experiments.cell([None, None]) == "n/a" and experiments.cell([None, 50.0]) == "50.0"


def tiny_detector(trained, freeze=True):
    torch.manual_seed(0)
    encoder, ckpt = detect.recipe.load_encoder(str(trained / "ckpt.pt"), torch.device("cpu"))
    encoder.train().requires_grad_(True)
    info = detect.data.DATASETS[ckpt["config"]["dataset"]]
    return encoder, detect.detector(encoder, 11, 64, freeze, info.mean, info.std, fpn=16)


def test_fine_tuning_leaves_the_frozen_stage_bit_identical_and_moves_the_others(trained, scenes):
    images, targets = scenes
    encoder, net = tiny_detector(trained)
    lowest = {k: v.clone() for k, v in encoder.stages[0].state_dict().items()}
    upper = {k: v.clone() for k, v in encoder.stages[1].state_dict().items()}
    losses = detect.fine_tune(net, list(images), targets, iterations=3, batch=2, lr=0.02, seed=0)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert lowest.keys() == encoder.stages[0].state_dict().keys()
    assert all(torch.equal(v, encoder.stages[0].state_dict()[k]) for k, v in lowest.items())
    assert any(not torch.equal(v, encoder.stages[1].state_dict()[k]) for k, v in upper.items())
    scores = detect.evaluate(net, list(images), detect.coco_ground_truth(targets, (64, 64)),
                             list(range(len(images))))
    assert set(scores) == {f"{k}_{m}" for k in ("bbox", "segm") for m in ("AP", "AP50", "AP75")}


def test_random_init_freezes_nothing(trained):
    encoder, net = tiny_detector(trained, freeze=False)
    assert all(p.requires_grad for p in encoder.parameters())


def test_one_iteration_through_a_coco_format_dataset(trained, scenes, tmp_path, capsys):
    """The COCO reader path (images + annotation JSON with polygon masks), end to end."""
    from PIL import Image
    images, targets = scenes
    anns, cats = [], [{"id": 7 + c, "name": str(c)} for c in range(10)]   # ids need not be 1..10
    for i, (x, t) in enumerate(zip(images, targets)):
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 6 + label,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0, "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64}
                   for i in range(len(images))], "annotations": anns, "categories": cats}))
    coco = [str(tmp_path), str(tmp_path / "ann.json")]
    result = detect.main([str(trained / "ckpt.pt"), "--coco-train", *coco, "--coco-val", *coco,
                          "--iterations", "1", "--batch", "2", "--fpn", "16",
                          "--out", str(tmp_path / "out")])
    assert result["train_scenes"] == len(images) and result["iterations"] == 1
    assert (tmp_path / "out" / "detect_loco_coco_0.json").exists()
