"""What a model is measured by: estimators of log p, one module each, in the ESTIMATORS registry
(likelihood: quadrature on a latent grid, quadrature.py, then importance sampling), the
inference-gap split (gaps) and evaluation's entry point (evaluate). May import model/, data/, objectives/, config/."""
