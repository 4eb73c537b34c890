"""Experiment 6: the preset configs.EXP6. Run: python exp6.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp6.py); --help lists every key."""
from configs import EXP6
from train import main

if __name__ == "__main__":
    main(EXP6)
