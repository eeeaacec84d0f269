"""Tests of gigaseg.training: the loop, checkpoints, budgets, DDP."""
