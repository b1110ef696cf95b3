"""Presentation from saved files only: statistics over seeds (statistics), figures (figures), the
self-contained HTML page (html), the one report writer for runs, sweeps and studies (sweep) and the
paper's reading (paper). May import storage/, data/, estimators/, runs/."""
