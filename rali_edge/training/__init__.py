"""The recipe that trains the built-in default model (rali_edge/assets/default-model/).

Run from nothing:  python -m rali_edge.training.default_model
Needs the `train` extra (scikit-image, scikit-learn and matplotlib, for the photographs inside them)
and, once, the network: 16 photographs come from three Debian packages (debian_photos.py). See
data.py for the images and their licences.
"""
