"""mogvae: does a VAE gain more from a more expressive prior or posterior?"""
__version__ = "0.1.0"
