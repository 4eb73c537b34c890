"""Experiment 7: the preset configs.EXP7. Run: python exp7.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp7.py); --help lists every key."""
from configs import EXP7
from train import main

if __name__ == "__main__":
    main(EXP7)
