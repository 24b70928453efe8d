"""Segmentation math without ComfyUI: bilinear gathering, the first-layer-before-upsampling identity,
the ensemble vote and uncertainty against a re-implementation of the official ``predict_labels``,
labels, the official training loop, the segmenter file and safe names."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plugkit.nodes.segmentation import pixel_classifier as pc
from plugkit.nodes.segmentation.segmenter import Segmenter, safe_child


def _members(n_classes=3, dim=12, k=5, seed=0):
    out = []
    for i in range(k):
        m = pc.PixelClassifier(n_classes, dim)
        m.init_weights(torch.Generator().manual_seed(seed + i), gain=0.5)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
            for bn in (m.layers[2], m.layers[5]):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
        out.append(m.eval())
    return out


@pytest.mark.parametrize("hw,out", [((4, 5), (32, 40)), ((8, 8), (64, 64)), ((3, 7), (10, 9))])
def test_gather_bilinear_equals_interpolate(hw, out):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 6, *hw, generator=g)
    ref = F.interpolate(feats, size=out, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    imgs = torch.randint(0, 2, (50,), generator=g)
    ys = torch.randint(0, out[0], (50,), generator=g)
    xs = torch.randint(0, out[1], (50,), generator=g)
    got = pc.gather_bilinear(feats, imgs, ys, xs, out)
    assert torch.allclose(got, ref[imgs, ys, xs], atol=1e-5)


def test_first_layer_before_upsampling_equals_official_upsample_then_mlp():
    """Official: MLP(bilinear_upsample(F)) per pixel. Ours: upsample(first Linear(F)) then the rest.
    Equal because bilinear weights sum to 1; applying the ReLU before upsampling would not be
    (checked below, so the test can tell the two apart)."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(12, 6, 7, generator=g)
    (m,) = _members(k=1)
    up = F.interpolate(feats[None], size=(48, 56), mode="bilinear", align_corners=False)[0]
    official = m(up.reshape(12, -1).T)
    ours = pc.member_logits(m, feats, (48, 56))
    assert torch.allclose(ours, official, atol=1e-5)
    first = m.layers[0]
    hidden = torch.relu(first.weight @ feats.reshape(12, -1) + first.bias[:, None]).reshape(1, -1, 6, 7)
    wrong = m.layers[2:](F.interpolate(hidden, size=(48, 56), mode="bilinear", align_corners=False)[0]
                         .reshape(hidden.shape[1], -1).T)
    assert not torch.allclose(wrong, official, atol=1e-3)


def official_predict_labels(models, features):
    """Written from the official src/pixel_classifier.py ``predict_labels`` (CPU, per pixel rows)."""
    from torch.distributions import Categorical

    mean_seg, all_entropy, seg_mode = None, [], []
    with torch.no_grad():
        for m in models:
            preds = m(features)
            all_entropy.append(Categorical(logits=preds).entropy())
            sm = torch.softmax(preds, dim=1)
            mean_seg = sm if mean_seg is None else mean_seg + sm
            seg_mode.append(preds.argmax(dim=1))  # oht_to_scalar
        mean_seg = mean_seg / len(models)
        full_entropy = Categorical(mean_seg).entropy()
        js = full_entropy - torch.mean(torch.stack(all_entropy), 0)
        final = torch.mode(torch.stack(seg_mode, dim=-1), 1)[0]
    return final, js


@pytest.mark.parametrize("k", [1, 4, 5, 10])
def test_vote_and_uncertainty_match_official(k):
    """Checked once that it can fail: voting by the mean softmax's arg-max instead of torch.mode, or
    a 0.9 factor on the mean entropy, fails the k = 4, 5 and 10 cases."""
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(12, 9, 9, generator=g)
    models = _members(k=k)
    labels, unc = pc.predict(models, feats, (9, 9))
    ref_labels, ref_js = official_predict_labels(models, feats.reshape(12, -1).T)
    assert torch.equal(labels.flatten(), ref_labels)
    assert torch.allclose(unc.flatten(), (ref_js / math.log(3)).clamp(0, 1), atol=1e-5)
    if k > 1:  # the members really disagree somewhere, so the vote is exercised
        votes = torch.stack([pc.member_logits(m, feats, (9, 9)).argmax(1) for m in models])
        assert bool((votes != votes[0]).any())
        assert float(unc.max()) > 0


def test_vote_ties_go_to_the_lower_class_like_torch_mode():
    models = _members(k=2)
    feats = torch.randn(12, 16, 16, generator=torch.Generator().manual_seed(3))
    votes = torch.stack([pc.member_logits(m, feats, (16, 16)).argmax(1) for m in models])
    labels, _ = pc.predict(models, feats, (16, 16))
    tie = votes[0] != votes[1]
    assert bool(tie.any())
    assert torch.equal(labels.flatten()[tie], torch.minimum(votes[0], votes[1])[tie])


def test_labels_from_colours_palette_order_and_errors():
    img = torch.zeros(1, 4, 4, 3)
    img[0, :2, :, 0] = 1.0  # red
    img[0, 3, 3] = torch.tensor([0.0, 0.0, 1.0])  # blue
    labels, palette = pc.labels_from_colours(img)
    assert palette == [(0, 0, 0), (0, 0, 255), (255, 0, 0)]
    assert labels[0, 0, 0] == 2 and labels[0, 3, 3] == 1 and labels[0, 2, 0] == 0
    ramp = torch.linspace(0, 1, 100).reshape(1, 10, 10, 1).expand(1, 10, 10, 3)
    with pytest.raises(ValueError, match="distinct colours"):
        pc.labels_from_colours(ramp)
    with pytest.raises(ValueError, match="single colour"):
        pc.labels_from_colours(torch.zeros(1, 4, 4, 3))


def test_downsample_labels_majority_and_ignore():
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    lab[0, :2, :2] = 1
    lab[0, 0, 0] = 2
    lab[0, 2:, 2:] = pc.IGNORE
    out = pc.downsample_labels(lab, (2, 2), 3)
    assert out.tolist() == [[[1, 0], [0, pc.IGNORE]]]


def test_pixelset_image_resolution_uses_upsampled_features():
    feats = torch.randn(1, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    data = pc.PixelSet(feats, labels)
    assert data.resolution == "image" and len(data) == 256
    x, y = data.batch(torch.arange(256))
    up = F.interpolate(feats, size=(16, 16), mode="bilinear", align_corners=False)[0].reshape(5, -1).T
    assert torch.allclose(x, up, atol=1e-5)


def test_training_separates_classes_and_stops_early():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 8, 12, 12, generator=g)
    labels = (feats[:, 0] + 0.5 * feats[:, 1] > 0).long()
    data = pc.PixelSet(feats, labels)
    model, stats = pc.train_classifier(data, 2, 8, seed=0)
    assert stats["early_stop"] and stats["epochs"] > pc.OFFICIAL_MIN_EPOCHS
    pred = model(feats.permute(0, 2, 3, 1).reshape(-1, 8)).argmax(1)
    assert float((pred == labels.flatten()).float().mean()) > 0.95


def test_segmenter_file_round_trip(tmp_path):
    models = _members(n_classes=3, dim=12, k=3)
    seg = Segmenter(family="SD15", decoder_blocks=12, latent_channels=4, steps=(50, 150), blocks=(5, 6),
                    block_channels=(4, 2), palette=[(0, 0, 0), (0, 0, 255), (255, 0, 0)], classifiers=models,
                    conditioning={"c_crossattn": torch.randn(1, 77, 8)})
    path = seg.save(tmp_path / "a.safetensors")
    back = Segmenter.load(path)
    assert (back.family, back.steps, back.blocks, back.palette, back.dim) == (seg.family, seg.steps, seg.blocks, seg.palette, 12)
    assert torch.equal(back.conditioning["c_crossattn"], seg.conditioning["c_crossattn"])
    feats = torch.randn(12, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(pc.predict(models, feats, (20, 20)), pc.predict(back.classifiers, feats, (20, 20))))
    with pytest.raises(ValueError, match="trained on SD15"):
        back.check_model("SDXL", 9, 4, "X")
    with pytest.raises(ValueError, match="4-channel latents"):
        back.check_model("SD15", 12, 16, "X")


def test_safe_child_refuses_traversal(tmp_path):
    assert safe_child(tmp_path, "a.safetensors") == (tmp_path / "a.safetensors").resolve()
    assert safe_child(tmp_path, "faces/eyes.safetensors") is not None
    for bad in ("../a.safetensors", "/etc/passwd", "faces/../../a", "", "a\\..\\b", "C:x"):
        assert safe_child(tmp_path, bad) is None, bad
