"""Tests of gigaseg.methods: the registry, the shared ModelTester (base.py) and one package per method."""
