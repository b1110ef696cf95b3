"""Units of work: a run's crash-safe folder (run), a sweep of runs (sweep), the executors
that run them (executors), reproduce (reproduce) and progress bars (progress).
May import storage/, model/, config/, data/, estimators/, training/."""
