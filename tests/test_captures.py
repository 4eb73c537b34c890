"""Real captures: LLFF (poses_bounds.npy) and Instant-NGP / nerfstudio (transforms.json) folders with known answers,
lens distortion, the scene's frame kept and applied to other views of the capture, bad folders, and the shared
scenes (fern, fox; skipped where absent)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import eval as evaluate
import train
from configs import EXP7
from conftest import (
    FOCAL,
    SHARED_DATA,
    images_of,
    llff_capture,
    one_line_error,
    run_cli,
    small,
    synthetic_capture,
    write_transforms,
)
from dataset import DataError, load_scene, read_llff, score_name
from render import Cameras, Frame, camera_directions, distort, get_rays


def score(run, data=None, split="auto"):
    """eval.py's result for a run on data (default: its own) and split."""
    return evaluate.run(argparse.Namespace(ckpt=run, data=data, split=split, out=None, device="cpu", per_view=False,
                                           threads=None))


@pytest.fixture
def llff(tmp_path):
    """A made-up 4-view forward-facing LLFF capture with images_4/ and images_8/; (folder, its c2w)."""
    return llff_capture(tmp_path / "llff")


def test_llff_axes_focal_and_image_folder_at_each_downscale(llff):
    folder, c2w = llff
    for downscale, hw in ((4, (12, 16)), (8, (6, 8)), (16, (3, 4))):  # 16: images_8 averaged by 2
        images, poses, intrinsics, _, bounds = read_llff(folder, downscale, [0.0] * 3)
        assert images[0].shape[:2] == hw
        np.testing.assert_allclose(poses, c2w, atol=1e-12)  # [down, right, back] back to [right, up, back]
        np.testing.assert_allclose(intrinsics[0], [FOCAL / downscale] * 2 + [hw[1] / 2, hw[0] / 2])
    assert bounds.min() == 2.0
    with pytest.raises(DataError, match=r"--downscale=2 needs images_2/ or a finer images_J/ .* images_4/, images_8/"):
        load_scene(folder, downscale=2)


def test_an_llff_capture_is_scaled_centred_and_rendered_in_ndc(llff):
    folder, c2w = llff
    scene = load_scene(folder, downscale=4, holdout=0)
    assert score_name(scene) == "training-view" and score_name(load_scene(folder, downscale=4)) == "val"
    frame = scene.frame
    assert (frame.space, frame.near, frame.far, frame.bound, frame.video) == ("ndc", 0.0, 1.0, 1.0, "spiral")
    scale = torch.linalg.det(torch.tensor(frame.transform)[:3, :3]) ** (1 / 3)
    assert scale.item() == pytest.approx(1 / (2.0 * 0.75))  # NeRF's bd_factor: the nearest bound at 1 / 0.75
    poses = scene.splits["train"].cameras.poses
    assert poses[:, :3, 3].mean(0).abs().max() < 1e-6  # centred on the mean pose
    cameras = scene.splits["train"].cameras
    ends = torch.cat([torch.cat([r.origins, r.origins + r.dirs]) for r in (get_rays(cameras, k, frame)
                                                                             for k in range(len(cameras)))])
    # the reference camera's NDC, fitted so the training views' rays span [-1, 1] in x and y: the hash grid's cube
    assert ends[:, :2].abs().amax(0).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert frame.ndc != pytest.approx([2 * FOCAL / 4 / 16, 2 * FOCAL / 4 / 12])  # the cameras differ: not camera 0's
    rays = get_rays(cameras, 0, frame)
    assert torch.allclose(rays.origins[:, 2], torch.full((12 * 16,), -1.0), atol=1e-5)  # on the near plane
    far = rays.origins + rays.dirs * 0.999  # t -> 1 is infinitely far: NDC z -> 1
    assert far[:, 2].min() > 0.99 and rays.viewdirs.norm(dim=-1).sub(1).abs().max() < 1e-5


def look_from(position):
    """An OpenGL camera-to-world at position looking at the origin, +z up."""
    position = np.asarray(position, dtype=np.float64)
    back = position / np.linalg.norm(position)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(back, right), back], 1)
    c2w[:3, 3] = position
    return c2w


def test_per_frame_intrinsics_an_off_centre_principal_point_and_images_of_two_sizes(tmp_path):
    """Each frame's fl_x, fl_y, cx, cy, w, h: a point projected by them lies on the ray through its pixel."""
    frames = [{"transform_matrix": look_from([3.0, 0.5, 1.0]).tolist(), "fl_x": 30.0, "fl_y": 34.0, "cx": 13.0,
               "cy": 7.5, "w": 24, "h": 20},
              {"transform_matrix": look_from([-1.0, 3.0, 0.5]).tolist(), "fl_x": 18.0, "fl_y": 18.0, "cx": 9.0,
               "cy": 11.0, "w": 16, "h": 24}]
    rng = np.random.default_rng(1)
    folder = write_transforms(tmp_path / "cap", frames, [rng.random((20, 24, 3)), rng.random((24, 16, 3))])
    scene = load_scene(folder, frame=Frame(), holdout=0)  # the identity frame: world coordinates
    cameras, views = scene.splits["all"].cameras, scene.splits["all"]
    assert [cameras.hw(k) for k in range(2)] == [(20, 24), (24, 16)] and views.image(1).shape == (24, 16, 3)
    for k, fr in enumerate(frames):
        w2c = np.linalg.inv(fr["transform_matrix"])
        for p in ([0.2, -0.1, 0.3], [-0.3, 0.2, -0.2]):
            x, y, z = w2c[:3, :3] @ p + w2c[:3, 3]
            u, v = fr["cx"] + fr["fl_x"] * x / -z, fr["cy"] - fr["fl_y"] * y / -z
            rays = get_rays(cameras, k)
            i = int(v) * fr["w"] + int(u)
            to_p = torch.tensor(p, dtype=torch.float32) - rays.origins[i]
            angle = torch.acos((to_p / to_p.norm()) @ rays.dirs[i]).item()
            assert angle < 0.75 / min(fr["fl_x"], fr["fl_y"])  # within half a pixel (diagonal)
    half = load_scene(folder, downscale=2, frame=Frame(), holdout=0).splits["all"].cameras
    torch.testing.assert_close(half.intrinsics, cameras.intrinsics / 2)
    assert half.hw(1) == (12, 8)


def test_a_distorted_pixels_ray_is_the_lens_models_inverse():
    """The ray through where the OpenCV model puts a point leaves in that point's direction, to 1e-5."""
    k = torch.tensor([0.0578421, -0.0805099, 0.01, -0.002, -0.000980296, 0.00015575], dtype=torch.float64)
    cams = Cameras(torch.eye(4, dtype=torch.float64)[None], torch.tensor([[1375.5, 1374.5, 554.6, 965.3]],
                   dtype=torch.float64), torch.tensor([[1920, 1080]]), k[None])
    x = torch.tensor([-0.35, 0.0, 0.12, 0.38], dtype=torch.float64)
    y = torch.tensor([0.6, -0.05, 0.33, -0.55], dtype=torch.float64)
    xd, yd = distort(x, y, k)
    i, j = 1375.5 * xd + 554.6 - 0.5, 1374.5 * yd + 965.3 - 0.5  # the pixel (its centre) the lens images them at
    d = camera_directions(cams, 0, i, j)
    expected = torch.nn.functional.normalize(torch.stack([x, -y, -torch.ones_like(x)], -1), dim=-1)
    assert (d - expected).abs().max() < 1e-5 and (xd - x).abs().max() > 1e-3  # the lens does bend them


def test_the_runs_frame_scores_other_views_of_its_capture_as_its_own(tmp_path):
    """Trained on one folder, scored on another holding only its validation views (every 8th): the same numbers as
    those views in the first folder: the frame is kept and applied (the way held-back views are scored)."""
    whole = synthetic_capture(tmp_path / "whole", list(range(16)))
    held = synthetic_capture(tmp_path / "held", [0, 8])
    cfg = {**small(tmp_path / "run"), "DATA": whole, "MAX_STEPS": 30}
    metrics = train.train(cfg)
    assert metrics["space"] == "cube" and metrics["val_views"] == 2 and metrics["scored_on"] == "val views"
    own = score(cfg["OUT_DIR"], whole, "val")
    other = score(cfg["OUT_DIR"], held, "all")
    assert other["views"] == own["views"] == 2 and other["psnr"] == pytest.approx(own["psnr"], abs=1e-4)
    assert own["psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-4)
    with open(os.path.join(cfg["OUT_DIR"], "config.json")) as f:
        saved = json.load(f)["FRAME"]
    assert saved["space"] == "cube" and np.allclose(saved["transform"], metrics_frame(cfg))


def test_a_bitnerf_export_keeps_the_frame_and_scores_held_back_views_as_training_did(tmp_path):
    """exp7's BitNeRF on a capture: the export carries the frame, so eval.py scores another folder's views with it."""
    whole = synthetic_capture(tmp_path / "whole", list(range(16)))
    held = synthetic_capture(tmp_path / "held", [0, 8])
    cfg = {**small(tmp_path / "run"), **{k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS")},
           "MODEL": "bitnerf", "EMB_DIM": 32, "HASH_LOG2_SIZE": 12, "GRID_RES": 32, "DATA": whole, "SPACE": "contract",
           "MAX_STEPS": 10}
    metrics = train.train(cfg)
    export = os.path.join(cfg["OUT_DIR"], "bitnerf_ternary.pt")
    other = score(export, held, "all")
    assert other["exported"] and other["psnr"] == pytest.approx(metrics["export_psnr"], abs=1e-4)
    assert metrics["space"] == "contract"  # the frame asked for, kept by the export


def metrics_frame(cfg):
    """The transform a run's checkpoint keeps."""
    return torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)["config"]["FRAME"]["transform"]


def test_bad_capture_folders_are_one_line(tmp_path, llff):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run_cli("exp1.py", f"--data={empty}", f"--out_dir={tmp_path / 'a'}"), "not a scene folder")
    folder, _ = llff
    os.remove(os.path.join(folder, "images_8", "image003.png"))
    with pytest.raises(DataError, match="3 images for 4 views in poses_bounds.npy"):
        load_scene(folder, downscale=8)
    np.save(os.path.join(folder, "poses_bounds.npy"), np.zeros((4, 10)))
    with pytest.raises(DataError, match=r"expected an \(N, 17\) array"):
        load_scene(folder, downscale=4)
    cap = tmp_path / "cap"
    cap.mkdir()
    (cap / "transforms.json").write_text(json.dumps({"camera_model": "OPENCV_FISHEYE", "frames": []}))
    with pytest.raises(DataError, match="OPENCV_FISHEYE is not supported"):
        load_scene(str(cap))
    (cap / "transforms.json").write_text(json.dumps({"fl_x": 10}))
    with pytest.raises(DataError, match="cannot read the capture"):
        load_scene(str(cap))
    around = synthetic_capture(tmp_path / "around", list(range(16)))  # cameras all around an object
    with pytest.raises(DataError, match="looks sideways or back .* use --space=cube"):
        load_scene(around, space="ndc")


@pytest.fixture
def fern():
    """../shared/data/nerf_llff_data/fern; skipped where absent."""
    path = os.path.join(SHARED_DATA, "nerf_llff_data", "fern")
    if not os.path.isdir(path):
        pytest.skip("../shared/data/nerf_llff_data/fern not present")
    return path


def test_fern_trains_in_ndc_and_its_held_back_views_score_from_their_own_folder(fern, tmp_path):
    """Real photos: PSNR rises in a short exp7 run; its validation views, given as a folder of their own (their own
    poses_bounds.npy, as held-back views come), score the same."""
    table = np.load(os.path.join(fern, "poses_bounds.npy"))
    held = tmp_path / "held"
    os.makedirs(held / "images_8")
    names = sorted(os.listdir(os.path.join(fern, "images_8")))
    for k in range(0, len(names), 8):
        os.symlink(os.path.join(fern, "images_8", names[k]), held / "images_8" / names[k])
    np.save(held / "poses_bounds.npy", table[::8])
    cfg = {**small(tmp_path / "run"), **{k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS", "USE_VIEWDIRS")},
           "DATA": fern, "DOWNSCALE": 48, "MAX_STEPS": 90, "EVAL_EVERY": 30, "EVAL_VIEWS": 3, "HASH_LOG2_SIZE": 14}
    metrics = train.train(cfg)
    assert metrics["space"] == "ndc" and metrics["resolution"] == "84x63"  # images_8 averaged by 6
    assert metrics["val_psnr"] > metrics["history"][0]["psnr"] + 1.0, metrics["history"]
    own = score(cfg["OUT_DIR"], split="val")
    other = score(cfg["OUT_DIR"], str(held), "all")
    assert other["views"] == 3 and other["psnr"] == pytest.approx(own["psnr"], abs=1e-4)


def test_the_fox_capture_loads_with_its_lens_and_renders(tmp_path):
    fox = os.path.join(SHARED_DATA, "fox")
    if not os.path.isdir(fox):
        pytest.skip("../shared/data/fox not present")
    scene = load_scene(fox, downscale=8)
    views = scene.splits["all"]
    assert len(views) == 43 and views.cameras.hw(0) == (240, 135) and views.cameras.distortion is not None
    assert scene.frame.space == "cube" and scene.frame.video == "orbit"  # Instant-NGP's aabb_scale 4
    train_positions = scene.splits["train"].cameras.poses[:, :3, 3]  # the frame is chosen from the training views
    assert train_positions.norm(dim=-1).max().item() == pytest.approx(1.0, abs=1e-5)
    assert images_of(views).shape == (43, 240, 135, 3)


def test_the_hash_table_and_finest_grid_follow_the_space_unless_set_and_a_resume_keeps_its_own(llff, tmp_path):
    """HASH_LOG2_SIZE and HASH_FINEST_RES at 0 are the data's: 2^17 and 1024 in NDC, 2^15 and 256 in a cube; a set
    value wins, and a run resumed with the defaults keeps what its checkpoint was trained with."""
    folder, _ = llff
    hashed = {k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS")}

    def saved_hash(run, **keys):
        train.train({**small(tmp_path / run), **hashed, "HASH_LEVELS": 2, "MAX_STEPS": 2, **keys})
        with open(tmp_path / run / "config.json") as f:
            saved = json.load(f)
        return saved["HASH_LOG2_SIZE"], saved["HASH_FINEST_RES"]

    assert EXP7["HASH_LOG2_SIZE"] == EXP7["HASH_FINEST_RES"] == 0
    assert saved_hash("ndc", DATA=folder, DOWNSCALE=8) == (17, 1024)
    assert saved_hash("cube") == (15, 256)
    assert saved_hash("set", DATA=folder, DOWNSCALE=8, HASH_LOG2_SIZE=12, HASH_FINEST_RES=64) == (12, 64)
    assert saved_hash("set", DATA=folder, DOWNSCALE=8, MAX_STEPS=4) == (12, 64)
    # what a run on the data resolves, without training (bench.py builds its models so): as the runs saved it
    resolved = train.data_config({**small(tmp_path / "x"), **hashed, "HASH_LEVELS": 2, "DATA": folder, "DOWNSCALE": 8})
    with open(tmp_path / "ndc" / "config.json") as f:
        trained = json.load(f)
    keys = ("SPACE", "NEAR", "FAR", "SCENE_BOUND", "HASH_LOG2_SIZE", "HASH_FINEST_RES", "FRAME")
    assert {k: resolved[k] for k in keys} == {k: trained[k] for k in keys}
    assert resolved["SPACE"] == "ndc" and (resolved["HASH_LOG2_SIZE"], resolved["HASH_FINEST_RES"]) == (17, 1024)


def test_with_no_view_held_out_the_scores_say_they_are_on_training_views(llff, tmp_path):
    folder, _ = llff
    cfg = {**small(tmp_path / "run"), "DATA": folder, "DOWNSCALE": 8, "HOLDOUT": 0, "MAX_STEPS": 2}
    metrics = train.train(cfg)
    assert metrics["scored_on"] == "training views" and metrics["val_views"] == 4
    assert score(cfg["OUT_DIR"])["scored_on"] == "training views"
