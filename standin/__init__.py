"""Stand-In: identity control for Wan video diffusion transformers."""

__version__ = "0.1.0"
