"""Experiment 2: the preset configs.EXP2. Run: python exp2.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp2.py); --help lists every key."""
from configs import EXP2
from train import main

if __name__ == "__main__":
    main(EXP2)
