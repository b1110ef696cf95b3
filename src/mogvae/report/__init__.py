"""Presentation from saved files only: statistics over seeds (statistics), figures
(figures), the self-contained HTML page (html), the reproduce report (paper) and any
sweep's report (sweep). May import storage/, data/, estimators/, runs/."""
