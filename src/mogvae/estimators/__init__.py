"""What a model is measured by: quadrature on a latent grid (quadrature), likelihoods by
quadrature or importance sampling (likelihood), the inference-gap split (gaps) and the
evaluation entry point (evaluate). May import model/, config/, data/, objectives/."""
