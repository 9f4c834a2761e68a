"""helios: adaptive model-and-depth selection for early-exit LLM serving (after HELIOS, arXiv 2504.10724)."""

__version__ = "0.1.0"
