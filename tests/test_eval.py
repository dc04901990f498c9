"""linear_eval.py, tsne.py, curves.py on a tiny trained run (conftest's `trained`)."""

import json

import pytest
import torch

import augment
import curves
import linear_eval
import train
import tsne
from conftest import TINY
from cli import UserError


def test_linear_eval_beats_chance_and_a_random_encoder(trained):
    learned = linear_eval.main([str(trained / "ckpt.pt"), "--subset", "2000"])
    random = linear_eval.main([str(trained / "ckpt.pt"), "--subset", "2000", "--random-init"])
    top1 = lambda r: r["stages"][-1]["top1"]
    assert top1(learned) > 20                         # chance is 10% on ten shapes
    assert top1(learned) > top1(random) + 5, (learned, random)
    assert (trained / "linear_eval_fast.json").exists()
    assert (trained / "linear_eval_fast_random.json").exists()
    assert [s["channels"] for s in learned["stages"]] == [8, 16, 32, 64]


def test_linear_eval_refuses_to_report_if_the_frozen_encoder_changed(trained, monkeypatch):
    """The bit-identity check is real: a forward in train mode moves BatchNorm's running
    statistics, and the evaluation must fail rather than report."""
    features = linear_eval.stage_features

    def moving_features(encoder, batches, info, rt):
        batches = list(batches)
        with torch.no_grad():
            encoder.train()(augment.standardize(batches[0][0], info.mean, info.std))
        return features(encoder, batches, info, rt)
    monkeypatch.setattr(linear_eval, "stage_features", moving_features)
    with pytest.raises(RuntimeError, match="changed"):
        linear_eval.main([str(trained / "ckpt.pt"), "--subset", "500"])


def test_linear_eval_paper_protocol_trains_a_classifier_per_stage_on_a_frozen_encoder(trained):
    """Mechanics only (SGD on raw features of so small an encoder learns too slowly to score; the
    frozen-encoder check inside linear_eval would raise): one row per stage, as wide as the
    stage, and the table on disk is the one returned."""
    r = linear_eval.main([str(trained / "ckpt.pt"), "--subset", "500", "--protocol", "paper",
                          "--epochs", "2", "--batch-size", "100", "--lr", "0.01"])
    assert [(s["stage"], s["channels"]) for s in r["stages"]] == [(1, 8), (2, 16), (3, 32), (4, 64)]
    assert json.loads((trained / "linear_eval_paper.json").read_text())["stages"] == r["stages"]


def test_linear_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a checkpoint written by train.py"):
        linear_eval.main([str(tmp_path / "other.pt")])


def test_tsne_draws_one_panel_per_checkpoint(trained, tmp_path):
    out = tmp_path / "tsne.png"
    fig = tsne.main([str(trained / "ckpt.pt")] * 2 + ["--out", str(out)])
    assert len(fig.axes) == 2 and all(len(ax.collections[0].get_offsets()) == 500 for ax in fig.axes)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 300_000


def test_curves_draw_one_line_per_unit_in_one_panel_per_run(trained, tmp_path):
    simclr = tmp_path / "simclr"
    train.main([*TINY, "--method", "simclr", "--epochs", "2", "--out", str(simclr)])
    out = tmp_path / "curves.png"
    fig = curves.main([str(simclr), str(trained), "--out", str(out)])
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1 + 4]   # LoCo: 4 units + SimCLR's
    assert [ax.get_title() for ax in fig.axes] == ["SimCLR", "LoCo"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
