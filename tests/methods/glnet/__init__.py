"""Tests of gigaseg.methods.glnet."""
