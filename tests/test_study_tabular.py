"""The tabular study end to end at toy size: its reading comes from metrics.csv. (Apart from
test_studies.py, so that the test workers, which take a file at a time, share the studies out.)"""
import numpy as np

from mogvae.cli import main
from test_studies import _metric, _row


def test_the_tabular_study_runs_at_toy_size_and_reads_per_dimension(tmp_path, capsys):
    out = tmp_path / "tabular"
    assert main(["study", "tabular", "--quick", "--out", str(out)]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Richer prior or richer posterior on real data?" in report
    for latent, how in ((2, "2-D quadrature"), (5, "importance sampling")):
        axes = {"data.dataset": "diabetes", "model.latent_dim": latent}
        mfg, prior = (_metric(out, m, "test_log_likelihood", **axes) for m in ("mfg", "mog-prior"))
        diff = np.mean([prior[s] - mfg[s] for s in mfg])
        row = _row(report, "diabetes", str(latent))
        assert row["evaluated by"].startswith(how) and f"{diff:+.3f}" in row["mog-prior − mfg"], row
        assert row["same, per dimension"].startswith(f"{diff / 10:+.4f}")     # diabetes has 10 dimensions
    assert (out / "figures" / "tabular.png").read_bytes()[:4] == b"\x89PNG"
