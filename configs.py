"""One plain dict per experiment; override any key with `python expN.py --key=value` (case-insensitive)."""


class UserError(Exception):
    """Bad input (config, data, files): reported as one line naming the problem and the fix, exit code 2."""


class ConfigError(UserError):
    """An unknown config key, or a value of the wrong type or out of range."""


EXP1 = {
    "EXPERIMENT": "exp1",        # name of the run (wandb run name, checkpoint tag)
    "RECIPE": "none",            # 'none' (the preset: 100 px views on a CPU) or a RECIPES name, applied over the preset
    # data
    "DATA": "auto",              # 'auto' (resuming an auto run: its data; else tiny_nerf or synthetic), .npz, dir, ...
    "DOWNSCALE": 1,              # a folder's image downscale (nerf_synthetic 800 px: 4 = 200 px; LLFF: images_K/)
    "BACKGROUND": "white",       # a folder's RGBA composited over 'white' (the field's protocol) or 'black'
    "HOLDOUT": 8,                # a capture (LLFF, transforms.json): every HOLDOUT-th view validates (0: train ones)
    "SPACE": "auto",             # 'auto' (the data's: ndc if forward-facing, else cube), 'cube', 'ndc', 'contract'
    "NEAR": 0.0,                 # depth where samples start along a ray (0 = the data's: 2 for Blender scenes)
    "FAR": 0.0,                  # depth where they end (0 = the data's: 6 for Blender scenes)
    "FRAME": "auto",             # the scene's frame: 'auto' (from the training views), or a run dir / ckpt.pt to share
    "OUT_DIR": "out/exp1",       # checkpoint, config.json, metrics.json and videos go here; rerun to resume (same data)
    # model (nerf.py, bitnerf.py)
    "MODEL": "nerf",             # 'nerf' (fp32 weights) or 'bitnerf' (RMSNorm + BitNet b1.58 ternary QAT and export)
    "ENCODING": "frequency",     # xyz: 'frequency' (sin/cos into the NUM_LAYERS MLP) or 'hash' (Instant-NGP's grid)
    "POS_ENCODE_DIMS": 10,       # positional-encoding frequencies of xyz (input itself included on top)
    "NUM_LAYERS": 8,             # hidden ReLU layers; the encoded input is concatenated back every 4
    "EMB_DIM": 64,               # width of each hidden layer
    "USE_VIEWDIRS": False,       # also feed the view direction (for view-dependent colour)
    "DIR_ENCODE_DIMS": 4,        # positional-encoding frequencies of the view direction
    "DENSITY_ACT": "relu",       # density activation: 'relu' (the original code's) or 'softplus' (never dies; slower)
    "HASH_LEVELS": 12,           # hash: grid levels, from HASH_BASE_RES to HASH_FINEST_RES in geometric steps
    "HASH_LOG2_SIZE": 0,         # hash: log2 of each level's table entries (a level whose grid fits is dense); 0 =
                                 # the data's: 17 in NDC (a forward-facing scene spans its whole square), else 15
    "HASH_FEATURES": 2,          # hash: learned features per table entry
    "HASH_BASE_RES": 16,         # hash: grid resolution of the coarsest level (cells per axis of the scene cube)
    "HASH_FINEST_RES": 0,        # hash: grid resolution of the finest level (0 = the data's: 1024 in NDC, else 256)
    "DENSITY_LAYERS": 1,         # hash: hidden layers (width EMB_DIM) of the density MLP, which outputs 16 values
    "COLOR_LAYERS": 2,           # hash: hidden layers (width EMB_DIM) of the colour MLP
    "HASH_TABLE_BITS": 5,        # hash + bitnerf: the table trains fake-quantized to, and exports as, 2 ... 8 bits
    # rendering (utils.py)
    "NUM_SAMPLES": 64,           # stratified samples per ray between the scene's near and far bounds
    "NUM_FINE": 0,               # extra samples per ray drawn where a no-grad first pass found density (0 = one pass)
    "CHUNK": 4096,               # rays per forward pass when rendering whole images (memory, not results)
    "OCC_GRID": True,            # skip samples in cells an occupancy grid finds empty (training, rendering; not NDC)
    "SCENE_BOUND": 0.0,          # the model's cube [-b, b]^3 (0 = the data's: 1.5 Blender, 1 NDC, from aabb_scale)
    "GRID_RES": 64,              # occupancy grid cells per axis
    "SKIP_ZERO_DENSITY": False,  # training: a no-grad pass drops the samples of zero ReLU density (no gradient) first
    "ERT_TRANSMITTANCE": 1e-4,   # a ray is no longer queried once its transmittance is below this: rendering, and
                                 # with NUM_FINE training too (from the coarse pass's estimate); 0 = off
    # optimisation
    "BATCH_SIZE": 1024,          # rays per step, drawn at random across all training images
    "TRAIN_THREADS": 0,          # CPU: threads a step's batch is split over (0: 2 where no occupancy grid (NDC); or 1)
    "LR": 2e-3,                  # peak AdamW learning rate (of the MLP, under ENCODING=hash)
    "HASH_LR": 1e-2,             # hash: peak learning rate of the table (the same schedule, scaled by HASH_LR / LR)
    "ADAM_EPS": 1e-8,            # AdamW epsilon (1e-15 for a hash table, as Instant-NGP: rare entries keep full steps)
    "MIN_LR": 5e-5,              # learning rate at the run's end, where the cosine decay after warm-up ends
    "WARMUP_STEPS": 100,         # linear LR warm-up steps (at most a tenth of the run; then the cosine to MIN_LR)
    "WEIGHT_DECAY": 0.0,         # AdamW decoupled weight decay
    "ADAM_BETA2": 0.999,         # AdamW's second-moment decay (torch's 0.999; Instant-NGP trains its table at 0.99)
    "AMSGRAD": False,            # AdamW's AMSGrad variant
    "FUSED_OPTIM": False,        # fused AdamW where the device supports it (elsewhere a notice and the plain one)
    "OPACITY_REG": 1e-2,         # weight of mean(acc * (1 - acc)): rays opaque or empty, so the grid culls more
    "DISTORTION": 0.0,           # weight of mip-NeRF 360's distortion loss: each ray's weight in one thin segment
    "NONFINITE": "stop",         # on a NaN/inf gradient: 'stop' (keep the last checkpoint, exit 2) or 'skip' the step
    "GRAD_CLIP": 0.0,            # clip the gradient norm to this (0 = off; the norm is logged either way)
    "MAX_STEPS": 7000,           # training steps; the LR schedule spans them (or TIME_BUDGET_S if that ends first)
    "TIME_BUDGET_S": 0.0,        # stop training after this many seconds, then evaluate (0 = off)
    "SEED": 0,                   # seeds the model init, the ray batches and the sample jitter
    "DEVICE": "auto",            # 'auto' (cuda if present), 'cpu' or 'cuda'
    "DTYPE": "float32",          # autocast dtype of the forward pass: float32 (off), bfloat16, float16 (CUDA only)
    "LAUNCH": "python",          # how it is meant to start: 'python' or 'torchrun' (a notice when it is not)
    "DDP_BACKEND": "auto",       # under torchrun: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'
    "CUDA_GRAPH": True,          # on CUDA: replay the training step as one CUDA graph (not under torchrun or float16)
    "COMPILE": False,            # torch.compile the model; off for fp32: with the grid it measured no faster (docs/)
    # evaluation and outputs
    "EVAL_EVERY": 250,           # validate every this many steps (0 = only at the end)
    "EVAL_VIEWS": 2,             # validation views rendered at each periodic validation (all of them at the end)
    "EVAL_AT_S": "",             # also validate on all views once training time passes each of these seconds: 150,300
    "CKPT_EVERY": 250,           # write ckpt.pt every this many steps (and always at the end)
    "LOG_EVERY": 25,             # log training loss, PSNR, grad-norm and LR every this many steps
    "VIDEO_FRAMES": 120,         # frames of the 360-degree video at the end (0 = no video)
    "VIDEO_EVERY": 0,            # also render the video every this many steps, as video_stepN.mp4 (0 = only at the end)
    "VIDEO_DOWNSCALE": 1,        # the video's resolution: the views' divided by this (full-size orbits are slow on CPU)
    "VIEWER": False,             # serve a web viewer of the model as it trains (rank 0); view.py shows a finished run
    "VIEWER_HOST": "127.0.0.1",  # the viewer's address: this machine only (ssh -L reaches it); another warns
    "VIEWER_PORT": 8080,         # the viewer's port (0 = any free one)
    "VIEWER_RES": 400,           # the viewer's sharp frame: pixels on its longer side (its time grows as their square)
    "VIEWER_FRAME_S": 2.0,       # ... or fewer, where the measured speed would take longer than this many seconds
    "WANDB": "auto",             # 'auto' (online with an API key, else offline), 'online', 'offline', 'disabled'
    "WANDB_PROJECT": "nerf-experiments",  # wandb project name
}

# exp2: the base NeRF under BF16 autocast, with the original code's AMSGrad and fused AdamW. SKIP_ZERO_DENSITY
# pays where the MLP dominates a step (bf16 on a CPU, QAT): docs/performance.md.
EXP2 = {**EXP1, "EXPERIMENT": "exp2", "OUT_DIR": "out/exp2", "DTYPE": "bfloat16", "AMSGRAD": True,
        "FUSED_OPTIM": True, "SKIP_ZERO_DENSITY": True}
# exp3: more samples per ray, spent where the density is (coarse -> fine).
EXP3 = {**EXP1, "EXPERIMENT": "exp3", "OUT_DIR": "out/exp3", "NUM_FINE": 16}
# exp4: BitNeRF, ternary hidden weights trained with BitNet b1.58 QAT; exported 2-bit packed at the end.
# LR 1e-2: the latent weights must move far enough to flip their ternary value. COMPILE fuses QAT's elementwise
# quantization passes. Fewer, wider ternary layers (4 x 160) won the depth/width sweep (docs/bitnerf.md).
EXP4 = {**EXP1, "EXPERIMENT": "exp4", "OUT_DIR": "out/exp4", "MODEL": "bitnerf", "LR": 1e-2, "COMPILE": True,
        "EMB_DIM": 160, "NUM_LAYERS": 4, "SKIP_ZERO_DENSITY": True}
# exp5 / exp6: exp1 / exp4 under DistributedDataParallel: `torchrun --standalone --nproc_per_node=2 exp5.py`.
# BATCH_SIZE stays the global batch (each of N processes renders BATCH_SIZE / N rays), so the LR is unchanged.
EXP5 = {**EXP1, "EXPERIMENT": "exp5", "OUT_DIR": "out/exp5", "LAUNCH": "torchrun"}
EXP6 = {**EXP4, "EXPERIMENT": "exp6", "OUT_DIR": "out/exp6", "LAUNCH": "torchrun"}
# exp7: Instant-NGP's multiresolution hash encoding and small MLP in place of the frequency encoding: Adam at 1e-2
# with epsilon 1e-15 and beta2 0.99 for table and MLP, as Instant-NGP; coarse -> fine samples and view directions
# (spherical harmonics) each paid over 1 dB in 5 minutes. Design and measurements: docs/hash.md, docs/captures.md.
EXP7 = {**EXP1, "EXPERIMENT": "exp7", "OUT_DIR": "out/exp7", "ENCODING": "hash", "LR": 1e-2, "HASH_LR": 1e-2,
        "ADAM_EPS": 1e-15, "ADAM_BETA2": 0.99, "NUM_FINE": 16, "USE_VIEWDIRS": True}
PRESETS = {cfg["EXPERIMENT"]: cfg for cfg in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6, EXP7)}
# configurations report.py trains beside the presets: name -> (the preset's script, the flags it adds).
# exp7-bitnerf's ternary MLP is 128 wide: at 64 its export fell over 1 dB below exp7 in 10 minutes (docs/hash.md).
VARIANTS = {"exp7-bitnerf": ("exp7", ("--model=bitnerf", "--compile=true", "--emb_dim=128"))}

# Recipes: a layer over any preset for nerf_synthetic views larger than the presets' 100 px, e.g.
#   python exp1.py --recipe=cpu200 --data=../shared/data/nerf_synthetic/lego
# A recipe sets only keys that scale with the views (resolution, samples, grid, batch, optimiser, schedule, evaluation,
# video); keys on the command line still win. How each value was chosen: docs/scale.md, docs/fullres.md.
RECIPES = {
    "none": {},
    # 200 x 200 (DOWNSCALE 4) in 10 minutes on a 2-core CPU: twice the samples per ray
    "cpu200": {"DOWNSCALE": 4, "TIME_BUDGET_S": 600.0, "MAX_STEPS": 10 ** 9, "EVAL_EVERY": 0,
               "EVAL_AT_S": "150,300", "NUM_SAMPLES": 128},
    # 800 x 800 on a 2-core CPU, an hour; the orbit at 200 x 200. A hash encoding (exp7) gets Instant-NGP's finest
    # grid for 800 px and a 2^19 table, whose dense AdamW step the fused kernel takes in one pass; Adam's beta2 is
    # torch's 0.999 for every preset, exp7's included: its hour scored lower at 0.99 (docs/fullres.md)
    "cpu800": {"DOWNSCALE": 1, "TIME_BUDGET_S": 3600.0, "MAX_STEPS": 10 ** 9, "EVAL_EVERY": 0,
               "EVAL_AT_S": "600,1800", "NUM_SAMPLES": 128, "VIDEO_DOWNSCALE": 4, "HASH_FINEST_RES": 2048,
               "HASH_LOG2_SIZE": 19, "FUSED_OPTIM": True, "ADAM_BETA2": 0.999},
    # 800 x 800 in 15 minutes on one large GPU (a starting point: not yet measured on a GPU)
    "gpu800": {"DOWNSCALE": 1, "TIME_BUDGET_S": 900.0, "MAX_STEPS": 10 ** 9, "EVAL_EVERY": 0,
               "EVAL_AT_S": "15,60,300", "BATCH_SIZE": 8192, "CHUNK": 32768, "NUM_SAMPLES": 256, "GRID_RES": 128,
               "EMB_DIM": 256},
}

CHOICES = {"MODEL": ("nerf", "bitnerf"), "ENCODING": ("frequency", "hash"), "DENSITY_ACT": ("relu", "softplus"),
           "DTYPE": ("float32", "bfloat16", "float16"), "DEVICE": ("auto", "cpu", "cuda"),
           "LAUNCH": ("python", "torchrun"), "BACKGROUND": ("white", "black"), "DDP_BACKEND": ("auto", "nccl", "gloo"),
           "NONFINITE": ("stop", "skip"), "WANDB": ("auto", "online", "offline", "disabled"),
           "SPACE": ("auto", "cube", "ndc", "contract"),
           "RECIPE": tuple(RECIPES)}
POSITIVE = ("NUM_LAYERS", "EMB_DIM", "NUM_SAMPLES", "CHUNK", "BATCH_SIZE", "LR", "MAX_STEPS", "DOWNSCALE",
            "EVAL_VIEWS", "CKPT_EVERY", "LOG_EVERY", "GRID_RES", "VIDEO_DOWNSCALE", "VIEWER_RES", "VIEWER_FRAME_S",
            "HASH_LEVELS", "HASH_FEATURES", "HASH_BASE_RES", "HASH_LR", "ADAM_EPS", "ADAM_BETA2")
NON_NEGATIVE = ("HASH_LOG2_SIZE", "HASH_FINEST_RES", "ERT_TRANSMITTANCE", "NUM_FINE", "OPACITY_REG", "DISTORTION",
                "POS_ENCODE_DIMS", "DIR_ENCODE_DIMS", "MIN_LR", "WARMUP_STEPS", "WEIGHT_DECAY", "GRAD_CLIP",
                "TIME_BUDGET_S", "SEED", "EVAL_EVERY", "VIDEO_FRAMES", "VIDEO_EVERY", "DENSITY_LAYERS", "COLOR_LAYERS",
                "SCENE_BOUND", "NEAR", "FAR", "HOLDOUT", "VIEWER_PORT", "TRAIN_THREADS")


def hash_data_defaults(space):
    """What HASH_LOG2_SIZE and HASH_FINEST_RES mean at 0 (the data's), by the space. In NDC a forward-facing
    capture's surfaces span the whole square at every depth: more fine cells than a 2^15 table holds, and its photos'
    detail (fern's fronds) wants a finer grid than 256 cells across the square (docs/captures.md)."""
    ndc = space == "ndc"
    return {"HASH_LOG2_SIZE": 17 if ndc else 15, "HASH_FINEST_RES": 1024 if ndc else 256}


def parse_value(key, text, default):
    """Parse text to the type of the key's default value, or raise ConfigError."""
    kind = type(default)
    try:
        if kind is bool:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        elif kind is int:
            value = float(text)
            if value != int(value):
                raise ValueError
            value = int(value)
        elif kind is float:
            value = float(text)
        else:
            value = text
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(f"--{key.lower()}={text}: expected {kind.__name__}, like --{key.lower()}={default}") from None
    return value


def check_config(cfg):
    """Reject out-of-range values with a message naming the key."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key.lower()}={cfg[key]}: must be one of {', '.join(allowed)}")
    for key in POSITIVE:
        if not cfg[key] > 0:
            raise ConfigError(f"--{key.lower()}={cfg[key]}: must be > 0")
    for key in NON_NEGATIVE:
        if not cfg[key] >= 0:
            raise ConfigError(f"--{key.lower()}={cfg[key]}: must be >= 0")
    if cfg["ERT_TRANSMITTANCE"] >= 1:
        raise ConfigError(f"--ert_transmittance={cfg['ERT_TRANSMITTANCE']}: must be below 1 "
                          "(1e-4 is a good value; 0 = off)")
    eval_at_seconds(cfg)
    coarsest = hash_data_defaults("cube")["HASH_FINEST_RES"]  # 0, the data's, is this or finer
    if (cfg["HASH_FINEST_RES"] or coarsest) < cfg["HASH_BASE_RES"]:
        raise ConfigError(f"--hash_finest_res={cfg['HASH_FINEST_RES']} (0: the data's, {coarsest} in a cube) is below "
                          f"--hash_base_res={cfg['HASH_BASE_RES']}; raise it")
    if not 2 <= cfg["HASH_TABLE_BITS"] <= 8:
        raise ConfigError(f"--hash_table_bits={cfg['HASH_TABLE_BITS']}: must be 2 ... 8")
    if cfg["HASH_LOG2_SIZE"] and not 8 <= cfg["HASH_LOG2_SIZE"] <= 24:
        raise ConfigError(f"--hash_log2_size={cfg['HASH_LOG2_SIZE']}: must be 8 ... 24 (Instant-NGP uses 14 ... 24), "
                          "or 0 (the data's)")
    if cfg["ADAM_BETA2"] >= 1:
        raise ConfigError(f"--adam_beta2={cfg['ADAM_BETA2']}: must be below 1 (torch's 0.999, Instant-NGP's 0.99)")
    if cfg["MIN_LR"] > cfg["LR"]:
        raise ConfigError(f"--min_lr={cfg['MIN_LR']} is above --lr={cfg['LR']}; lower it")
    if cfg["NEAR"] and cfg["FAR"] and cfg["NEAR"] >= cfg["FAR"]:
        raise ConfigError(f"--near={cfg['NEAR']} is not below --far={cfg['FAR']}; samples run from near to far")


def eval_at_seconds(cfg):
    """EVAL_AT_S as a sorted list of seconds, or a ConfigError."""
    try:
        marks = sorted(float(t) for t in cfg["EVAL_AT_S"].split(",") if t.strip())
    except ValueError:
        marks = [-1.0]
    if any(m <= 0 for m in marks):
        raise ConfigError(f"--eval_at_s={cfg['EVAL_AT_S']}: expected positive seconds separated by commas, "
                          "like --eval_at_s=150,300,600")
    return marks


def with_defaults(old):
    """A config written by an older version, with the keys added since at EXP1's values (and WHITE_BKGD as the
    BACKGROUND that replaced it), so that old runs resume and evaluate."""
    old = dict(old)
    if "WHITE_BKGD" in old:
        old["BACKGROUND"] = "white" if old.pop("WHITE_BKGD") else "black"
    return {**EXP1, **old}


def key_docs():
    """Each key's one-line comment in EXP1's definition above: {KEY: comment}."""
    import re

    with open(__file__, encoding="utf-8") as f:
        return dict(re.findall(r'^ +"([A-Z0-9_]+)": .*?# (.+)$', f.read(), re.M))


def usage(preset, script):
    """What `python expN.py --help` prints: how to override, then every key with this preset's value."""
    docs = key_docs()
    flags = {k: f"--{k.lower()}={v}" for k, v in preset.items()}
    width = max(map(len, flags.values()))
    return "\n".join([f"usage: python {script} [--key=value ...] [--debug]   (keys case-insensitive; "
                      "--debug shows tracebacks)", "keys, with this preset's values:",
                      *(f"  {flags[k]:<{width}}  {docs.get(k, '')}" for k in preset)])


def apply_overrides(cfg, argv):
    """The preset, then the RECIPE it names or --recipe names, then the other `--key=value` arguments; type-checked
    and range-checked."""
    keys = {k.lower(): k for k in cfg}
    parsed = []
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ConfigError(f"bad argument {arg!r}: use --key=value")
        if name.lower() not in keys:
            raise ConfigError(f"unknown key --{name}; valid keys: {', '.join(sorted(keys))}")
        key = keys[name.lower()]
        parsed.append((key, parse_value(key, text, cfg[key])))
    recipe = dict(parsed).get("RECIPE", cfg["RECIPE"])
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe={recipe}: must be one of {', '.join(RECIPES)}")
    cfg = {**cfg, **RECIPES[recipe], **dict(parsed)}
    check_config(cfg)
    return cfg
