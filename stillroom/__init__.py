"""stillroom: distil an expensive teacher LLM into a small student that is proven good enough."""

__version__ = "0.1.0"
