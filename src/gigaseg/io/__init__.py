"""Lazy readers and streaming writers for images far larger than RAM."""
