"""Experiment 6: see configs.EXP6. Run: python exp6.py [--key=value ...]"""
from configs import EXP6
from train import main

if __name__ == "__main__":
    main(EXP6)
