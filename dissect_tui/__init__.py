"""dissect-tui: CLIP-Dissect neuron labelling, a DuckDB cache, and a terminal explorer."""

__version__ = "0.1.0"
