"""Tests of gigaseg.methods.icnet."""
