"""Training objectives, one module each: the sampled bounds (ELBO, IWAE) and the exact
likelihood oracle, in the OBJECTIVES registry that `train.objective` names.
May import model/. Adding one: a module here with an object like bounds.ELBO, and its line below."""
from .bounds import ELBO, IWAE
from .exact import EXACT

OBJECTIVES = {o.name: o for o in (ELBO, IWAE, EXACT)}

__all__ = ["OBJECTIVES"]
