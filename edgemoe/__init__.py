"""edgemoe: Mixture-of-Experts language models streamed from storage under a RAM budget."""

__version__ = "0.1.0"
