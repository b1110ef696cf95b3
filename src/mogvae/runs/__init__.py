"""Units of work: a run's crash-safe folder (run), a sweep of runs (sweep), the executors
that run them (executors), reproduce's plan (reproduce), progress (progress) and the Python API
(results: mogvae.load; train_api: mogvae.train). May import every subpackage below report/."""
