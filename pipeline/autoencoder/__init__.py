"""First-stage autoencoders: networks, VQ codebook, Gaussian posterior, LPIPS, GAN loss."""
