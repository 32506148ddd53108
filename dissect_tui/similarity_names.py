"""Names of the similarity functions, importable without torch (for argparse choices)."""

SIMILARITY_NAMES = ("soft_wpmi", "wpmi", "rank_reorder", "cos")
