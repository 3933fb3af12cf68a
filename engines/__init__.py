"""Engine builders and runners (shipped as rali_edge.engines)."""
