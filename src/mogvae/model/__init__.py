"""The model: latent distributions, mixtures and flows, the priors, posteriors and
decoders built from batched layers with a replica axis (layers), and the VAE that
holds them (vae). The bottom floor: imports no other subpackage."""
