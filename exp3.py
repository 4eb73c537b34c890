"""Experiment 3: see configs.EXP3. Run: python exp3.py [--key=value ...]"""
from configs import EXP3
from train import main

if __name__ == "__main__":
    main(EXP3)
