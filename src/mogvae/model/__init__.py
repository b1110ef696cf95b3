"""The model: latent distributions, mixtures and flows, the priors, posteriors and
decoders built from batched layers with a replica axis (layers), the VAE that holds them
(vae) and the latent grid quadrature integrates on (grid). The bottom floor: imports nothing else."""
