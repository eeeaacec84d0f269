"""Tests of gigaseg.nn: encoders, the FPN, losses."""
