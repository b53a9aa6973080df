"""ganforge: train generative image models, export them, serve them from NVIDIA Triton."""

__version__ = "0.1.0"
