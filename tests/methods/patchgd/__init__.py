"""Tests of gigaseg.methods.patchgd."""
