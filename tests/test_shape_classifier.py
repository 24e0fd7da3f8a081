"""The shape classifier that judges whether the tiny model's objects are recognisable."""

import pytest
import torch

from vidsparse.tiny.data import SHAPES, render, sample_conditions
from vidsparse.tiny.classifier import (
    ShapeClassifier, load_shape_classifier, main, shape_accuracy, single_object, train_shape_classifier,
)


def _single_object_val(n):
    cond = sample_conditions(64, seed=0, split="val")
    idx = torch.nonzero(single_object(cond)).flatten()[:n]
    return cond[idx]


def _next_shape(cond):
    """The same conditions with every present object's shape moved one on (wrong labels)."""
    return type(cond)(shape=torch.where(cond.shape >= 0, (cond.shape + 1) % len(SHAPES), cond.shape),
                      colour=cond.colour, motion=cond.motion, background=cond.background, key=cond.key)


def test_single_object_counts_present_objects():
    cond = sample_conditions(32, seed=3, split="train")
    expected = (cond.shape >= 0).sum(1) == 1
    assert torch.equal(single_object(cond), expected)
    assert 0 < int(expected.sum()) < 32  # 1 or 2 objects per clip in the default config


def test_shipped_classifier_recognises_real_validation_clips():
    cond = _single_object_val(12)
    videos = render(cond)
    result = shape_accuracy(videos, cond, load_shape_classifier())
    assert result["clips"] == 12
    assert result["accuracy"] >= 0.9 and result["frame_accuracy"] >= 0.85


def test_noise_scores_near_chance_and_wrong_labels_score_low():
    cond = _single_object_val(12)
    clf = load_shape_classifier()
    noise = shape_accuracy(torch.randn(12, 3, 16, 64, 64, generator=torch.Generator().manual_seed(0)), cond, clf)
    assert noise["accuracy"] <= 0.6
    # the same real clips judged against shifted labels: the classifier must disagree
    assert shape_accuracy(render(cond), _next_shape(cond), clf)["accuracy"] <= 0.2


def test_per_shape_breakdown_and_confusion_count_each_clip_once():
    cond = _single_object_val(12)
    clf = load_shape_classifier()
    # labels moved one shape on: a real clip of shape s is (almost always) voted s, conditioned s + 1
    for labels, diagonal in ((cond, True), (_next_shape(cond), False)):
        r = shape_accuracy(render(cond), labels, clf)
        conf = torch.tensor(r["confusion"])
        assert conf.shape == (len(SHAPES), len(SHAPES)) and int(conf.sum()) == 12
        truth = labels.shape[:, 0]
        assert conf.sum(1).tolist() == [int((truth == i).sum()) for i in range(len(SHAPES))]
        assert r["accuracy"] == pytest.approx(int(conf.diagonal().sum()) / 12)
        for i, name in enumerate(SHAPES):
            n = int(conf[i].sum())
            assert r["per_shape"][name] == (None if n == 0 else pytest.approx(int(conf[i, i]) / n))
        mass = conf.diagonal().sum() if diagonal else sum(int(conf[(i + 1) % len(SHAPES), i]) for i in range(len(SHAPES)))
        assert int(mass) >= 11


def test_only_single_object_clips_count_and_bad_shapes_are_errors():
    cond = sample_conditions(16, seed=1, split="val")
    two = cond[torch.nonzero(~single_object(cond)).flatten()[:2]]
    assert shape_accuracy(render(two), two, ShapeClassifier())["accuracy"] is None
    with pytest.raises(ValueError, match="videos must be"):
        shape_accuracy(torch.zeros(3, 3, 16, 64, 64), two, ShapeClassifier())
    with pytest.raises(ValueError, match="frames must be"):
        ShapeClassifier()(torch.zeros(2, 1, 32, 32))


def test_training_runs_and_saves_a_loadable_model(tmp_path):
    model, info = train_shape_classifier(steps=2, batch_clips=4, frames_per_clip=2, size=32, progress=False)
    assert set(info) >= {"final_loss", "val_frame_accuracy", "train_s"} and info["steps"] == 2
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(SHAPES))
    assert main(["--out", str(tmp_path), "--steps", "1", "--no-progress"]) == 0
    loaded = load_shape_classifier(tmp_path)
    x = render(_single_object_val(1))[:, :, 0]
    trained = ShapeClassifier()
    trained.load_state_dict(loaded.state_dict())
    assert torch.equal(loaded(x), trained.eval()(x))
    with pytest.raises(FileNotFoundError, match="no shape classifier"):
        load_shape_classifier(tmp_path / "missing")
