"""Tests of gigaseg.models; base.ModelTester is the shared test base of every method."""
