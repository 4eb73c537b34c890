"""Experiment 5: see configs.EXP5. Run: python exp5.py [--key=value ...]"""
from configs import EXP5
from train import main

if __name__ == "__main__":
    main(EXP5)
