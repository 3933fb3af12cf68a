"""rali-edge: a Triton-accelerated edge runtime for RALI no-reference image quality scores.

    import rali_edge
    scorer = rali_edge.load()               # the built-in model; or a folder from `rali-edge convert`
    scorer.score(["photo.jpg", "other.png"])  # -> [3.87, 2.41]
"""

__version__ = "0.1.0"

__all__ = ["load", "Scorer", "__version__"]


def __getattr__(name):
    # Imported on first use, so that `import rali_edge` (and `rali-edge --help`) stays fast without torch.
    if name in ("load", "Scorer"):
        from rali_edge import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'rali_edge' has no attribute {name!r}")
