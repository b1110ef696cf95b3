"""Data: one module per source, each with its config section and loader (paper, folded,
files, tabular; base says what a source is), and their registry (sources.SOURCES).
May import storage/ (the Strict base of a section)."""
