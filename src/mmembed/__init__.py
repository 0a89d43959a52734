"""mmembed: a self-hosted multimodal embedding service speaking the DashScope API."""

__version__ = "0.1.0"
