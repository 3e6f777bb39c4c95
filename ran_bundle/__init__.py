"""Residual Aligner Network (RAN) for unsupervised deformable registration, as MONAI blocks and a bundle."""

__version__ = "0.4.0"
