"""Experiment 4: see configs.EXP4. Run: python exp4.py [--key=value ...]"""
from configs import EXP4
from train import main

if __name__ == "__main__":
    main(EXP4)
