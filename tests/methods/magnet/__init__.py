"""Tests of gigaseg.methods.magnet."""
