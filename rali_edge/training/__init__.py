"""The recipe that trains the built-in default model (rali_edge/assets/default-model/).

Run from nothing, offline:  python -m rali_edge.training.default_model
Needs scikit-image (for its bundled CC0 / public-domain photographs); see data.py for the images
and their licences.
"""
