"""dualsynth: synthetic micrograph + mask pairs (dual images) from a few real ones.

Implements Volman Stern et al. (2024), "Synthetic dual image generation for reduction of labeling efforts in
semantic segmentation of micrographs with a customized metric function": a VQ-VAE on joint micrograph+mask
images, an autoregressive prior over its codes, mask clean-up, and a U-Net study scored with Missing Class IoU.
"""

__version__ = "0.1.0"
