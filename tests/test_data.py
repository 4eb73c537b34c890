"""The three data sources, their validation, and bad files."""
import os

import numpy as np
import pytest
import torch

import dataset
from conftest import SHARED_DATA, images_of, write_blender
from dataset import DataError, load_scene, sample_batch, synthetic_scene


@pytest.fixture(scope="module")
def synth():
    return synthetic_scene(n_views=6, size=16)


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_round_trip_and_seed_split(tmp_path, synth):
    images, poses, focal = synth
    scene = load_scene(write_npz(tmp_path / "s.npz", images=images, poses=poses, focal=focal))
    assert len(scene.splits["train"]) == 5 and len(scene.splits["val"]) == 1
    assert torch.equal(scene.splits["val"].image(0), torch.from_numpy(images[5]))
    assert scene.splits["train"].cameras.intrinsics[0].tolist() == pytest.approx([focal, focal, 8, 8])
    assert (scene.frame.near, scene.frame.far, scene.frame.space) == (2.0, 6.0, "cube")


def test_uint8_images_are_scaled(tmp_path, synth):
    images, poses, focal = synth
    scene = load_scene(write_npz(tmp_path / "u.npz", images=(images * 255).astype(np.uint8), poses=poses,
                                 focal=focal))
    assert scene.splits["all"].pixels.max() <= 1.0 and scene.splits["all"].pixels.dtype == torch.float32


BAD = {
    "missing key": (lambda i, p, f: dict(images=i, poses=p), "missing arrays"),
    "wrong image shape": (lambda i, p, f: dict(images=i[..., 0], poses=p, focal=f), "images must be"),
    "count mismatch": (lambda i, p, f: dict(images=i, poses=p[:-1], focal=f), "to match"),
    "NaN pixels": (lambda i, p, f: dict(images=np.where(i > 0.5, np.nan, i), poses=p, focal=f), "NaN"),
    "string dtype": (lambda i, p, f: dict(images=i.astype(str), poses=p, focal=f), "float in [0, 1] or uint8"),
    "non-rigid pose": (lambda i, p, f: dict(images=i, poses=p * 2, focal=f), "rigid"),
    "bad focal": (lambda i, p, f: dict(images=i, poses=p, focal=-1.0), "focal"),
    "no views": (lambda i, p, f: dict(images=i[:0], poses=p[:0], focal=f), "no views"),
    "out of range": (lambda i, p, f: dict(images=i * 3, poses=p, focal=f), "[0, 1]"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_npz_is_refused_with_a_reason(tmp_path, synth, case):
    make, words = BAD[case]
    with pytest.raises(DataError, match=words[:12].replace("[", r"\[").replace("]", r"\]")):
        load_scene(write_npz(tmp_path / "bad.npz", **make(*synth)))


def test_truncated_and_missing_files(tmp_path, synth):
    path = write_npz(tmp_path / "t.npz", images=synth[0], poses=synth[1], focal=synth[2])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match="not a readable .npz"):
        load_scene(path)
    with pytest.raises(DataError, match="--data=synthetic"):
        load_scene(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="not a scene folder: expected poses_bounds.npy"):
        load_scene(str(tmp_path))


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("NERF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", "http://127.0.0.1:9/tiny_nerf_data.npz")
    with pytest.raises(DataError, match="--data=PATH.*--data=synthetic") as failed:
        load_scene("tiny_nerf")
    assert os.listdir(tmp_path) == []  # no partial download left behind
    message = str(failed.value)  # the network failed, not the disk: say so (it said "free disk space")
    assert message.startswith("could not download http://127.0.0.1:9/") and "refused" in message
    assert f"put it at {tmp_path / 'tiny_nerf_data.npz'}" in message and "disk" not in message


def test_a_downscale_that_does_not_divide_the_images_is_refused(tmp_path, synth):
    """Cropping the remainder would shift the image centre and shrink the focal (at 3 on 800 px: 1/3 px, 0.25 %)."""
    folder = write_blender(tmp_path / "scene", *synth)  # 16 x 16
    for downscale in (3, 32):
        with pytest.raises(DataError, match=f"--downscale={downscale} does not divide its 16x16 images; use one "
                                            "that does: 1, 2, 4, 8, 16"):
            load_scene(folder, downscale=downscale)
    assert load_scene(folder, downscale=16).splits["train"].cameras.hw(0) == (1, 1)


def test_download_is_validated_before_it_is_kept(tmp_path, monkeypatch, synth):
    src = write_npz(tmp_path / "src.npz", images=synth[0], poses=synth[1], focal=synth[2])
    cache = tmp_path / "cache"
    monkeypatch.setenv("NERF_CACHE_DIR", str(cache))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", "file://" + src)
    scene = load_scene("tiny_nerf")
    assert len(scene.splits["all"]) == 6 and os.listdir(cache) == ["tiny_nerf_data.npz"]


def test_blender_folder_background_and_downscale(tmp_path, synth):
    images, poses, focal = synth
    folder = write_blender(tmp_path / "scene", images, poses, focal)
    black = load_scene(folder, background="black")
    white = load_scene(folder)  # the default: the field's protocol
    half = load_scene(folder, downscale=2)
    bg = torch.from_numpy(images[0].max(-1) == 0)
    assert torch.allclose(black.splits["train"].image(0)[bg], torch.zeros(3))
    assert torch.allclose(white.splits["train"].image(0)[bg], torch.ones(3))
    assert half.splits["val"].cameras.hw(0) == (8, 8)
    assert half.splits["val"].cameras.intrinsics[0, 0].item() == pytest.approx(focal / 2, rel=1e-4)
    assert sorted(black.splits) == ["train", "val"]  # what training reads
    assert sorted(load_scene(folder, splits=("all",)).splits) == ["all", "train", "val"]


def test_blender_folder_without_val_or_with_bad_json(tmp_path, synth):
    folder = write_blender(tmp_path / "scene", *synth, splits=("train",))
    with pytest.raises(DataError, match="no transforms_val.json"):
        load_scene(folder)
    (tmp_path / "scene" / "transforms_val.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the scene"):
        load_scene(folder)


def test_batches_carry_the_right_target_colours(synth):
    scene = load_scene("synthetic")
    views = scene.splits["train"]
    rays, target = sample_batch(views, 256, torch.Generator().manual_seed(0))
    assert rays.origins.shape == (256, 3) and target.shape == (256, 3)
    # each target is a pixel of some training image
    flat = views.pixels
    assert all((flat == c).all(-1).any() for c in target[:20])


def test_shared_lego_tiny_matches_the_nerf_synthetic_folder(lego_tiny):
    """The 100 px npz and the 800 px folder downscaled by 8 are the same views (checks both loaders)."""
    folder = os.path.join(SHARED_DATA, "nerf_synthetic", "lego")
    if not os.path.isdir(folder):
        pytest.skip("../shared/data/nerf_synthetic/lego not present")
    tiny = load_scene(lego_tiny)
    big = load_scene(folder, downscale=8, background="black")
    assert len(tiny.splits["all"]) == 90 and tiny.splits["all"].cameras.hw(0) == (100, 100)
    assert torch.allclose(tiny.splits["all"].cameras.poses[:80], big.splits["train"].cameras.poses, atol=1e-5)
    torch.testing.assert_close(big.splits["train"].cameras.intrinsics, tiny.splits["all"].cameras.intrinsics[:80],
                               rtol=1e-3, atol=0)
    assert (images_of(tiny.splits["all"])[:80] - images_of(big.splits["train"])).abs().mean() < 0.02


def test_rgba_npz_is_composited_over_its_black_background(tmp_path, synth):
    images, poses, focal = synth
    alpha = np.linspace(0, 1, images.shape[2], dtype=np.float32)[None, None, :, None].repeat(16, 1).repeat(6, 0)
    scene = load_scene(write_npz(tmp_path / "rgba.npz", images=np.concatenate([images, alpha], -1), poses=poses,
                                 focal=focal))
    got = images_of(scene.splits["all"])
    assert got.shape == (6, 16, 16, 3)
    torch.testing.assert_close(got, torch.from_numpy(images * alpha))  # alpha 0 is black, not the RGB beneath
    uint8 = load_scene(write_npz(tmp_path / "u8.npz", images=(np.concatenate([images, alpha], -1) * 255).round()
                                 .astype(np.uint8), poses=poses, focal=focal)).splits["all"]
    assert (images_of(uint8) - got).abs().max() < 2 / 255
