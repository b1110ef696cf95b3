"""Configuration: the validated schema (schema), TOML files and --set overrides (files),
the commented reference file (reference) and the TOML parser shim (tomlcompat).
May import model/ (names are checked against its PRIORS and POSTERIORS)."""
