"""Experiment 1, the base NeRF (fp32): see configs.EXP1. Run: python exp1.py [--key=value ...]"""
from configs import EXP1
from train import main

if __name__ == "__main__":
    main(EXP1)
