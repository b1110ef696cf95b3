"""Training objectives: the ELBO, IWAE and their log-weights, one value per point
(bounds). May import model/."""
