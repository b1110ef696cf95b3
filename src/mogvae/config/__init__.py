"""Configuration: the validated schema (schema), TOML files and --set overrides (files),
the commented reference file (reference) and the TOML parser shim (tomlcompat). May import
storage/, model/, data/ and objectives/: the schema checks names against their registries."""
