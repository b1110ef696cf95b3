"""Data: the paper's process (paper), the folded process (folded), data files (files),
scikit-learn's tables (tabular) and the registry that turns a data config into splits
and their truth (sources). May import config/."""
