"""gigaseg: memory-efficient perception of ultra-high-resolution images."""

__version__ = "0.1.0"
