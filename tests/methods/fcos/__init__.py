"""Tests of the fcos method: network, training views, recipe and training end to end."""
