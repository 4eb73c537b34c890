"""Experiment 3: the preset configs.EXP3. Run: python exp3.py [--key=value ...], or under torchrun when its
LAUNCH key says so (torchrun --standalone --nproc_per_node=2 exp3.py); --help lists every key."""
from configs import EXP3
from train import main

if __name__ == "__main__":
    main(EXP3)
