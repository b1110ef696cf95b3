"""The dimension study end to end at toy size: its reading comes from metrics.csv. (Apart from
test_studies.py, so that the test workers, which take a file at a time, share the studies out.)"""
import numpy as np

from mogvae.cli import main
from mogvae.data.folded import FoldedProcess
from test_studies import _metric, _row


def test_the_dimension_study_runs_at_toy_size_and_its_reading_comes_from_metrics(tmp_path, capsys):
    out = tmp_path / "dimension"
    assert main(["study", "dimension", "--quick", "--out", str(out)]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "## Does the paper's finding survive more observed dimensions?" in report
    assert "![dimension](figures/dimension.png)" in report
    for setting in ("0", "all"):
        axes = {"data.breaking": setting, "data.data_dim": 5}
        mfg, post = (_metric(out, m, "test_log_likelihood", **axes) for m in ("mfg", "mog-posterior"))
        diff = np.mean([post[s] - mfg[s] for s in mfg])
        row = _row(report.split(f"breaking = {setting})")[1].split("\n### ")[0], "5")
        assert f"{diff:+.4f}" in row["mog-posterior − mfg, test LL"], row
        truth = FoldedProcess(5, 1, 0 if setting == "0" else 4, 0.1).log_prob(
            np.load(out / "runs" / f"data.breaking={setting}__data.data_dim=5__preset=mfg" / "data" / "test.npy"))
        assert row["true LL"] == f"{truth.mean():.4f}"
    figure_rows = (out / "figures" / "dimension.csv").read_text().splitlines()
    kl = _metric(out, "mog-both", "kl_to_truth", **{"data.breaking": "all", "data.data_dim": 5})
    assert any(r.startswith("all,5,kl_to_truth,mog-both,") and abs(float(r.split(",")[4]) - np.mean(list(
        kl.values()))) < 1e-12 for r in figure_rows)
