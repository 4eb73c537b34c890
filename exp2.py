"""Experiment 2: see configs.EXP2. Run: python exp2.py [--key=value ...]"""
from configs import EXP2
from train import main

if __name__ == "__main__":
    main(EXP2)
