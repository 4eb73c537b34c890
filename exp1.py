"""Experiment 1: the preset configs.EXP1. Run: python exp1.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp1.py); --help lists every key."""
from configs import EXP1
from train import main

if __name__ == "__main__":
    main(EXP1)
