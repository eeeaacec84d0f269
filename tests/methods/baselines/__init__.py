"""Tests of gigaseg.methods.baselines."""
