"""gsmsearch: structure search for efficient neural networks."""
__version__ = "0.1.0"
