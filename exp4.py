"""Experiment 4: the preset configs.EXP4. Run: python exp4.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp4.py); --help lists every key."""
from configs import EXP4
from train import main

if __name__ == "__main__":
    main(EXP4)
