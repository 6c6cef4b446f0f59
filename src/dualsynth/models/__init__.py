"""nn.Modules of the paper: the VQ-VAE and the PixelCNN priors."""
