"""nerfstudio's nerfacto beside exp7 on the same views: the steps of docs/nerfacto-peer.sh (not part of the project).

  prepare SCENE DST DOWNSCALE   (project venv) DST: the scene's train and val views averaged as exp7 reads them,
                                over white, as 8-bit RGBA PNGs; transforms_test.json names the val views, which
                                ns-eval and eval.py --split=test then score
  train BUDGET_S NS-TRAIN-ARGS  (peer venv) ns-train, stopped once its loop has run BUDGET_S seconds
  render CONFIG_YML OUT_NPY     (peer venv) the trained model's renders of the test views, float32 (N, H, W, 3)
  score DST OUT_NPY             (project venv) PSNR and SSIM of those renders, by utils.psnr / utils.ssim as eval.py
"""
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules (its venv)


def prepare(scene, dst, downscale):
    """The views exp7 trains on, written where nerfstudio's blender-data reads them."""
    import imageio.v2 as imageio
    import numpy as np
    import torch

    from dataset import load_blender_split

    for split in ("train", "val"):
        with open(os.path.join(scene, f"transforms_{split}.json")) as f:
            meta = json.load(f)
        views = load_blender_split(scene, split, int(downscale), torch.ones(3))
        os.makedirs(os.path.join(dst, split), exist_ok=True)
        for k, frame in enumerate(meta["frames"]):
            rgb = (views.image(k).numpy() * 255 + 0.5).astype(np.uint8)
            name = f"{split}/r_{k}"
            imageio.imwrite(os.path.join(dst, name + ".png"), np.dstack([rgb, np.full_like(rgb[..., :1], 255)]))
            frame["file_path"] = "./" + name
        for out in (split, "test") if split == "val" else (split,):
            with open(os.path.join(dst, f"transforms_{out}.json"), "w") as f:
                json.dump(meta, f, indent=1)


def without_torchvision_ops():
    """PyPI's torchvision registers fake kernels for C++ ops that its extension, built for CUDA, did not load
    beside the CPU torch; nerfacto uses none of them."""
    for name in ("_meta_registrations", "_autograd_registrations"):
        sys.modules[f"torchvision.{name}"] = types.ModuleType(f"torchvision.{name}")


def without_lpips():
    """nerfacto builds LPIPS at construction, which downloads AlexNet's weights: offline here, so it reports NaN."""
    import torch
    import torchmetrics.image.lpip as lpip

    class NoLPIPS(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def forward(self, *args, **kwargs):
            return torch.tensor(float("nan"))

    lpip.LearnedPerceptualImagePatchSimilarity = NoLPIPS


def train(budget_s, args):
    """ns-train with its loop stopped (and the model saved, as at its normal end) after budget_s seconds."""
    without_torchvision_ops()
    without_lpips()
    from nerfstudio.engine.trainer import Trainer
    from nerfstudio.scripts.train import entrypoint

    step_once, clock = Trainer.train_iteration, {"start": None, "steps": 0}

    def timed_iteration(self, step):
        clock["start"] = clock["start"] or time.perf_counter()
        clock["steps"] += 1
        if time.perf_counter() - clock["start"] >= float(budget_s):
            self.stop_training = True  # the loop ends before its next step, then saves the checkpoint
        return step_once(self, step)

    Trainer.train_iteration = timed_iteration
    sys.argv = ["ns-train", *args]
    entrypoint()
    print(f"nerfacto_peer: {clock['steps']} steps in {time.perf_counter() - clock['start']:.1f} s", flush=True)


def render(config_yml, out_npy):
    """The test views as the trained model renders them."""
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # nerfstudio's own checkpoints hold numpy scalars
    without_torchvision_ops()
    without_lpips()
    from pathlib import Path

    import numpy as np
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, step = eval_setup(Path(config_yml), test_mode="test")
    cameras = pipeline.datamanager.eval_dataset.cameras
    start, images = time.perf_counter(), []
    with torch.no_grad():
        for k in range(len(cameras)):
            images.append(pipeline.model.get_outputs_for_camera(cameras[k:k + 1])["rgb"].float().cpu().numpy())
    print(f"nerfacto_peer: step {step}, {len(images)} views in {time.perf_counter() - start:.1f} s", flush=True)
    np.save(out_npy, np.stack(images))


def score(dst, out_npy):
    """PSNR and SSIM of the renders against the test views, as eval.py scores."""
    import numpy as np
    import torch

    from dataset import load_blender_split
    from utils import psnr, ssim

    views = load_blender_split(dst, "test", 1, torch.ones(3))
    renders = torch.from_numpy(np.load(out_npy))
    scores = [(psnr(renders[k], views.image(k)), ssim(renders[k], views.image(k))) for k in range(len(views))]
    psnrs, ssims = zip(*scores, strict=True)
    print(json.dumps({"views": len(scores), "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}))


if __name__ == "__main__":
    steps = {"prepare": prepare, "train": lambda budget, *args: train(budget, args), "render": render,
             "score": score}
    steps[sys.argv[1]](*sys.argv[2:])
