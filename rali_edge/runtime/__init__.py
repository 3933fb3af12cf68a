"""Runtime: streams."""
