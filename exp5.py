"""Experiment 5: the preset configs.EXP5. Run: python exp5.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp5.py); --help lists every key."""
from configs import EXP5
from train import main

if __name__ == "__main__":
    main(EXP5)
