"""Feature segmentation nodes in a real ComfyUI (CPU, tiny SD1.5-layout U-Net, tiny VAE; see conftest)."""
import pytest
import torch


def _segment(env, segmenter, images=None, **kw):
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegment

    return PlugKitFeatureSegment.execute(segmenter=segmenter, model=kw.pop("model", env["model"]),
                                         vae=kw.pop("vae", env["vae"]),
                                         images=env["images"][2:] if images is None else images, **kw).result


def pooled_iou(preds, targets, cls):
    """IoU accumulated over all images, as the official ``compute_iou``."""
    inter = sum(int(((p == cls) & (t == cls)).sum()) for p, t in zip(preds, targets))
    union = sum(int(((p == cls) | (t == cls)).sum()) for p, t in zip(preds, targets))
    return inter / union


@pytest.fixture(scope="module")
def segmented(seg_env, trained):
    torch.set_num_threads(1)
    return _segment(seg_env, trained[0])


def test_held_out_iou_and_raw_pixels_do_worse(seg_env, trained, segmented):
    """Trained on 2 scenes, segments 2 other scenes at IoU >= 0.9 (measured: see docs); a pixel
    classifier of the same recipe on raw RGB pixels cannot, because colour carries no class signal."""
    from plugkit.nodes.segmentation import pixel_classifier as pc

    mask = segmented[0]
    target = seg_env["masks"][2:].long()
    ious = [pooled_iou(mask.long(), target, 1), pooled_iou(mask.long(), target, 0)]
    # raw pixels: same MLP, same training loop, on 4096 random pixels of each training image
    images = seg_env["images"][:2].permute(0, 3, 1, 2).contiguous()
    labels = seg_env["masks"][:2].long()
    keep = torch.zeros(labels.numel(), dtype=torch.bool)
    keep[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))[:8192]] = True
    labels = torch.where(keep.reshape(labels.shape), labels, torch.full_like(labels, pc.IGNORE))
    models, _ = pc.ensemble(pc.PixelSet(images, labels), 2, 3, 4, 0)
    held = seg_env["images"][2:].permute(0, 3, 1, 2)
    raw = torch.stack([pc.predict(models, f, tuple(f.shape[-2:]))[0] for f in held])
    raw_ious = [pooled_iou(raw, target, 1), pooled_iou(raw, target, 0)]
    print("features", ious, "raw pixels", raw_ious, trained[1])
    assert min(ious) >= 0.9, ious
    assert max(raw_ious) < 0.75 and min(ious) - max(raw_ious) > 0.2, (ious, raw_ious)


def test_outputs_report_and_uncertainty(seg_env, trained, segmented):
    segmenter, report = trained
    mask, class_masks, labels, unc = segmented
    assert mask.shape == (2, 256, 256) and class_masks.shape == (4, 256, 256) and labels.shape == (2, 256, 256, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(class_masks[1::2], mask) and torch.equal(class_masks[0::2], 1 - mask)
    assert torch.equal(labels, mask[..., None].expand(-1, -1, -1, 3))  # palette black / white
    assert 0 <= float(unc.min()) and float(unc.max()) <= 1
    wrong = mask != seg_env["masks"][2:]
    assert float(unc[wrong].mean()) > 2 * float(unc[~wrong].mean())  # disagreement marks the errors
    assert "class 1 (255, 255, 255):" in report and "Time:" in report
    acc = float(report.split("class 1 (255, 255, 255): ")[1].split("%")[0])
    assert acc > 90
    assert segmenter.n_classes == 2 and len(segmenter.classifiers) == 4
    assert segmenter.steps == (50, 150, 250) and segmenter.blocks == (5, 6, 7, 8, 9)


@pytest.fixture
def segmenter_dir(tmp_path, monkeypatch, comfy):
    import folder_paths

    from plugkit.nodes.segmentation.model_folders import FOLDER, segmenter_folders

    segmenter_folders()
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, FOLDER, ([str(tmp_path)] + list(paths), exts))
    return tmp_path


def test_save_load_segment_equals_in_memory(seg_env, trained, segmented, segmenter_dir):
    """Bitwise equal outputs. Checked once that it can fail: an unseeded feature noise fails it."""
    from plugkit.nodes.segmentation.model_folders import list_segmenters
    from plugkit.nodes.segmentation.nodes import PlugKitLoadSegmenter, PlugKitSaveSegmenter

    (path,) = PlugKitSaveSegmenter.execute(segmenter=trained[0], name="sub/test_seg").result
    assert path == str((segmenter_dir / "sub" / "test_seg.safetensors").resolve())
    assert "sub/test_seg.safetensors" in list_segmenters()
    (loaded,) = PlugKitLoadSegmenter.execute(segmenter_name="sub/test_seg.safetensors").result
    again = _segment(seg_env, loaded)
    for a, b in zip(again, segmented):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already exists"):
        PlugKitSaveSegmenter.execute(segmenter=trained[0], name="sub/test_seg", overwrite=False)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/../../b"])
def test_save_and_load_refuse_path_traversal(trained, segmenter_dir, name):
    from plugkit.nodes.segmentation.nodes import PlugKitLoadSegmenter, PlugKitSaveSegmenter

    with pytest.raises(ValueError, match="PlugKitSaveSegmenter: input 'name'"):
        PlugKitSaveSegmenter.execute(segmenter=trained[0], name=name)
    with pytest.raises(ValueError, match="PlugKitLoadSegmenter: input 'segmenter_name'"):
        PlugKitLoadSegmenter.execute(segmenter_name=name + ".safetensors")
    assert not list(segmenter_dir.parent.glob("escape*"))


def test_load_refuses_other_files(segmenter_dir):
    import safetensors.torch

    from plugkit.nodes.segmentation.nodes import PlugKitLoadSegmenter

    safetensors.torch.save_file({"w": torch.zeros(2)}, str(segmenter_dir / "other.safetensors"))
    with pytest.raises(ValueError, match="not a PlugKit segmenter"):
        PlugKitLoadSegmenter.execute(segmenter_name="other.safetensors")
    with pytest.raises(ValueError, match="not found"):
        PlugKitLoadSegmenter.execute(segmenter_name="missing.safetensors")


def _tiny_sdxl():
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from tools.fixtures.models import random_init

    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
           "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 0, 0, 0, 0],
           "channel_mult": [1, 2, 4], "transformer_depth_middle": 0, "use_linear_in_transformer": True,
           "context_dim": 2048, "num_head_channels": 32, "transformer_depth_output": [0] * 9,
           "use_temporal_resblock": False, "use_temporal_attention": False}
    config = comfy.supported_models.SDXL(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    random_init(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _vae16():
    import comfy.ldm.models.autoencoder
    import comfy.sd

    from tools.fixtures.models import random_init

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    random_init(module, 0)
    return comfy.sd.VAE(sd={k: v.clone() for k, v in module.state_dict().items()},
                        config={"params": {"ddconfig": ddconfig, "embed_dim": 16}})


def test_wrong_family_or_latent_channels_are_clear_errors(seg_env, trained):
    segmenter = trained[0]
    images = seg_env["images"][2:3, :64, :64]
    with pytest.raises(ValueError, match="PlugKitFeatureSegment: input 'model' is a SDXL U-Net .* trained on SD15"):
        _segment(seg_env, segmenter, images=images, model=_tiny_sdxl())
    with pytest.raises(ValueError, match="PlugKitFeatureSegment: input 'vae' makes 16-channel latents"):
        _segment(seg_env, segmenter, images=images, vae=_vae16())
    with pytest.raises(ValueError, match="class_index"):
        _segment(seg_env, segmenter, images=images, class_index=2)


def test_bad_training_inputs(seg_env):
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegmenterTrain

    env = seg_env
    kw = dict(model=env["model"], vae=env["vae"])
    with pytest.raises(ValueError, match="exactly one of 'masks'"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:1], **kw)
    with pytest.raises(ValueError, match="input 'masks' is"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:2], masks=env["masks"][:1], **kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:1, :100, :100], masks=env["masks"][:1, :100, :100], **kw)
    with pytest.raises(ValueError, match="input 'blocks'"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:1], masks=env["masks"][:1], blocks="12", **kw)
    nan = env["images"][:1].clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        PlugKitFeatureSegmenterTrain.execute(images=nan, masks=env["masks"][:1], **kw)
    nan_mask = env["masks"][:1].clone()
    nan_mask[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'masks' contains NaN"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:1], masks=nan_mask, **kw)
    with pytest.raises(ValueError, match="no painted or no unpainted"):
        PlugKitFeatureSegmenterTrain.execute(images=env["images"][:1], masks=torch.zeros_like(env["masks"][:1]), **kw)


def test_label_image_gives_several_classes(seg_env):
    """Three flat colours -> three classes, numbered by colour; the label output uses those colours."""
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegmenterTrain

    env = seg_env
    images = env["images"][:1, :64, :64]
    label = torch.zeros(1, 64, 64, 3)
    label[0, :, 32:, 0] = 1.0  # red right half
    label[0, 48:, :, :] = torch.tensor([0.0, 1.0, 0.0])  # green bottom band
    seg, report = PlugKitFeatureSegmenterTrain.execute(model=env["model"], vae=env["vae"], images=images,
                                                       label_image=label, ensemble_size=1, max_epochs=6,
                                                       resolution="image").result
    assert seg.resolution == "image" and "4096 image pixels" in report
    assert seg.palette == [(0, 0, 0), (0, 255, 0), (255, 0, 0)] and seg.source == "label_image"
    mask, class_masks, labels, unc = _segment(env, seg, images=images, class_index=2)
    assert class_masks.shape == (3, 64, 64) and torch.equal(class_masks[2], mask[0])
    colours = {tuple(c) for c in (labels[0] * 255).round().long().reshape(-1, 3).tolist()}
    assert colours <= {(0, 0, 0), (0, 255, 0), (255, 0, 0)}
    assert "class 2 (255, 0, 0):" in report


def test_sdxl_layout_trains_and_segments(seg_env):
    """SDXL's 9-block decoder: default blocks 2-6, the zero context is 2048 wide with a pooled
    output for the ADM input; the segmenter records SDXL and refuses the SD1.5 model."""
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegmenterTrain

    env = seg_env
    sdxl = _tiny_sdxl()
    images = env["images"][:1, :64, :64]
    masks = torch.zeros(1, 64, 64)
    masks[:, :, 32:] = 1.0
    seg, _ = PlugKitFeatureSegmenterTrain.execute(model=sdxl, vae=env["vae"], images=images, masks=masks,
                                                  ensemble_size=1, max_epochs=5).result
    assert seg.family == "SDXL" and seg.blocks == (2, 3, 4, 5, 6)
    assert seg.conditioning["c_crossattn"].shape == (1, 77, 2048) and seg.conditioning["pooled_output"].shape == (1, 1280)
    mask = _segment(env, seg, images=images, model=sdxl)[0]
    assert mask.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="is a SD15 U-Net .* trained on SDXL"):
        _segment(env, seg, images=images)


def test_masks_painted_at_another_size_are_resized_to_the_images(seg_env, trained):
    """A mask at twice the image size (the image was scaled after loading, as the CPU tests do): resized
    (nearest) to the images, it trains exactly the segmenter the image-sized masks train; under
    torch.inference_mode() as in the server."""
    from plugkit.nodes.segmentation.nodes import PlugKitFeatureSegmenterTrain

    env = seg_env
    big = env["masks"][:2].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    torch.set_num_threads(1)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        seg, _ = PlugKitFeatureSegmenterTrain.execute(model=env["model"], vae=env["vae"], images=env["images"][:2],
                                                      masks=big, ensemble_size=4, seed=0).result
    want, got = trained[0].state()[0], seg.state()[0]
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_encode_and_features_keep_no_autograd_graph(seg_env):
    """Called with gradients on (a script or another node, not ComfyUI's inference mode), the latents
    and features carry no graph: before, each 512 px latent kept about 3 GB of encoder activations."""
    from plugkit.nodes.segmentation import hooks, runs

    env = seg_env
    for p in env["vae"].first_stage_model.parameters():
        p.requires_grad_(True)  # as ComfyUI 0.3.75 loads them (0.33 turns it off)
    with torch.enable_grad():
        latents = runs.encode(env["vae"], env["images"][:2])
        feats, _ = hooks.extract_features(env["model"], latents, (50,), (5, 9), hooks.empty_conditioning(env["model"]),
                                          0, "test")
    assert latents.grad_fn is None and not latents.requires_grad
    assert feats.grad_fn is None and not feats.requires_grad
