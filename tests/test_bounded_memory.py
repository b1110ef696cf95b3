"""Memory bounded whatever the data's size. The folded truth at any D: computed in chunks over nodes
and points, it equals the direct sum over every node and SciPy's dblquad, and stays within its
budget; at D = 1000, L = 2 it runs in 2 GiB with a converged rule. What evaluation cannot hold at
the data's dimension, or the truth cannot compute in time, is refused before training, naming a
setting that fits. Text data files are parsed a block at a time by numpy's C parser, equal to
Python's float() across block boundaries, in about 8 bytes a value, with refusals that name the row."""
import csv
import json
import re
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from scipy import integrate
from scipy.special import logsumexp

from mogvae.data import files as data_files
from mogvae.data.files import DataError, load_data_file
from mogvae.estimators.evaluate import check_evaluable
from mogvae.data.folded import TRUTH_TOLERANCE, FoldedProcess
from mogvae.runs.run import RunConfig

BUDGET = 20_000   # elements: every array of the truth's computation stays within a few of these


def traced_peak(f, *args, **kwargs):
    """(f's result, the peak bytes numpy and Python allocated while it ran)."""
    tracemalloc.start()
    try:
        return f(*args, **kwargs), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("data_dim, latent_dim, breaking", [(5, 2, 2), (1000, 1, 400)])
def test_the_truth_in_chunks_equals_the_direct_sum_over_every_node_within_its_budget(data_dim, latent_dim, breaking):
    process = FoldedProcess(data_dim, latent_dim, breaking, 0.1)
    _, y = process.sample(3, 7)
    z, log_w = process._node_chunk(1, 0, 10**9)              # the whole rule of the first refinement, [G, L]
    direct = np.array([logsumexp(process.log_likelihood(p, z) + log_w) for p in y])   # |y - m(z)|^2 directly
    chunked, peak = traced_peak(process.log_prob, y, BUDGET)
    assert peak < 8 * 8 * BUDGET                  # measured 1.5-3.6 x; the direct way holds [G, D]: 24-48 MB
    np.testing.assert_allclose(chunked, direct, rtol=0, atol=1e-12)
    np.testing.assert_allclose(process.log_prob(y, budget=10**12), chunked, rtol=0, atol=1e-12)   # one chunk

    grid = np.random.default_rng(0).uniform(-0.1, 1.1, size=(3000, latent_dim))   # some outside [0, 1]^L
    posterior, peak = traced_peak(process.posterior, y, grid, BUDGET)
    assert peak < 8 * 8 * BUDGET + posterior.nbytes
    inside = ((grid >= 0) & (grid <= 1)).all(1)
    expected = np.where(inside, np.exp(process.log_likelihood(y[:, None], grid[None]) - direct[:, None]), 0.0)
    np.testing.assert_allclose(posterior, expected, rtol=1e-12, atol=1e-300)       # subnormals: absolute


def test_the_2d_truth_equals_scipys_dblquad_within_its_budget():
    """dblquad on each quadrant (the kinks z_l = 1/2 are their edges), independent of the process's
    Gauss-Legendre rule and of its chunks."""
    process = FoldedProcess(3, 2, 1, 0.1)
    _, y = process.sample(2, 5)
    log_p, peak = traced_peak(process.log_prob, y, BUDGET)
    assert peak < 8 * 8 * BUDGET
    for point, value in zip(y, log_p):
        total = sum(integrate.dblquad(lambda z1, z0: np.exp(process.log_likelihood(point, np.array([z0, z1]))),
                                      a, a + 0.5, b, b + 0.5, epsabs=0, epsrel=1e-11)[0]
                    for a in (0.0, 0.5) for b in (0.0, 0.5))
        assert abs(np.log(total) - value) < 1e-10


PROBE_D1000 = """
import json, resource, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))   # the means alone were 4.4 GiB
from mogvae.data.folded import FoldedProcess
default = FoldedProcess(1000, 2, 0, 0.1)
_, y = default.sample(2, 1)
tracemalloc.start()
log_p, error = default.log_prob_and_error(y)
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
finer = FoldedProcess(1000, 2, 0, 0.1, panel_fraction=(50 / 1000) ** 0.5).log_prob(y)   # half the default's start
coarse, coarse_error = FoldedProcess(1000, 2, 0, 0.1, panel_fraction=1.0).log_prob_and_error(y)
print(json.dumps({"peak": peak, "log_p": log_p.tolist(), "error": error.tolist(), "finer": finer.tolist(),
                  "coarse": coarse.tolist(), "coarse_error": coarse_error.tolist()}))
"""


def test_the_truth_at_d_1000_l_2_runs_in_2_gib_and_refines_from_any_start_to_the_same_value():
    """In a process limited to 2 GiB of address space. The posterior narrows as 1/sqrt(D): a first
    rule of panels at the full scale sigma / slope (the fixed rule before the adaptive one was off by
    ~1e-5 there) refines further, to the value of a start 4.5 times finer (twice the default's)."""
    proc = subprocess.run([sys.executable, "-c", PROBE_D1000], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["peak"] < 8 * 8 * 4_000_000                          # the default budget's few arrays
    np.testing.assert_allclose(out["log_p"], out["finer"], rtol=1e-13, atol=0)     # log p* about 850 here
    np.testing.assert_allclose(out["coarse"], out["finer"], rtol=1e-13, atol=0)
    assert max(out["error"] + out["coarse_error"]) <= TRUTH_TOLERANCE


def refusal(**settings) -> str | None:
    """check_evaluable's message for a run configuration with these settings (None: evaluable)."""
    config = RunConfig(**settings)
    try:
        check_evaluable(config.resolved_model(), config.eval, config.train, config.data, config.seeds)
    except ValueError as e:
        return str(e)
    return None


FOLDED_1000 = {"name": "folded", "data_dim": 1000, "latent_dim": 2}


def test_the_attacked_configuration_and_the_largest_shipped_cells_are_evaluable():
    assert refusal(data=FOLDED_1000) is None                  # folded D = 1000, L = 2, every other default
    for latent_dim, grid in ((5, 401), (2, 401)):              # the tabular study's widest data, digits
        assert refusal(seeds=10, model={"latent_dim": latent_dim}, eval={"grid_size": grid},
                       data={"name": "tabular", "dataset": "digits"}) is None


def test_a_truth_too_slow_to_compute_is_refused_naming_settings_that_fit():
    folded = {"name": "folded", "data_dim": 3, "latent_dim": 2, "sigma": 0.01}
    message = refusal(data=folded)
    assert message and "\n" not in message and "17,822,720 nodes" in message, message
    suggested = message.rsplit(": set ", 1)[1]
    n_test = int(re.search(r"data\.n_test <= ([\d,]+)", suggested)[1].replace(",", ""))
    sigma = float(re.search(r"data\.sigma >= ([\d.e-]+)", suggested)[1])
    assert refusal(data={**folded, "n_test": n_test}) is None
    assert refusal(data={**folded, "n_test": n_test + 1}) is not None      # the largest that fits
    assert refusal(data={**folded, "sigma": sigma}) is None
    assert refusal(data={**folded, "sigma": sigma * 0.9}) is not None     # within 10% of the least


@pytest.mark.parametrize("settings, key, fits", [
    ({"model": {"latent_dim": 2}, "eval": {"grid_size": 499}, "data": {**FOLDED_1000, "data_dim": 300}},
     "eval.grid_size", lambda v: {"eval": {"grid_size": v}}),
    ({"seeds": 20, "data": FOLDED_1000}, "seeds", lambda v: {"seeds": v}),
    ({"eval": {"n_generated": 100_000}, "data": FOLDED_1000}, "eval.n_generated",
     lambda v: {"eval": {"n_generated": v}}),
    ({"model": {"latent_dim": 2}, "eval": {"grid_size": 101}, "data": FOLDED_1000}, "model.latent_dim",
     lambda v: {"model": {"latent_dim": v}}),
    ({"model": {"latent_dim": 3}, "data": FOLDED_1000}, "model.latent_dim", lambda v: {"model": {"latent_dim": v}}),
    ({"model": {"latent_dim": 3}, "eval": {"grid_size": 401}, "data": {**FOLDED_1000, "data_dim": 800}},
     "model.latent_dim", lambda v: {"model": {"latent_dim": v}}),
])
def test_evaluation_memory_at_the_datas_dimension_is_refused_naming_a_setting_that_fits(settings, key, fits):
    message = refusal(**settings)
    assert message and "\n" not in message and "GiB to evaluate" in message, message
    suggested = message.rsplit(": set ", 1)[1]
    value = int(re.search(re.escape(key) + r" (?:<=|=) ([\d,]+)", suggested)[1].replace(",", ""))
    fixed = {**settings, **{k: {**settings.get(k, {}), **v} if isinstance(v, dict) else v
                            for k, v in fits(value).items()}}
    assert refusal(**fixed) is None, (fixed, refusal(**fixed))
    config = RunConfig(**settings)                                        # without the data: as before
    check_evaluable(config.resolved_model(), config.eval, config.train)


# -- text data files -----------------------------------------------------------------------------------

MIXED = ("# a header, with commas\n"
         "\n"
         "0.5, -1.25e-3 ,3\n"
         "1e3,\t+.5,5.\r\n"
         "   # indented comment\n"
         "-0,2,3,\n"
         "4 5 6\n"                                # spaces in a comma file: read line by line
         "7,8,9 # trailing comment, with a comma\n"
         "1E-300,-2.5E+5,0.001,,\n"
         "\t10\t11\t12\t\n")


def reference(text: str) -> np.ndarray:
    """Python's csv module for rows with commas, str.split for the others, float() for values."""
    rows = []
    for line in text.split("\n"):
        content = line.split("#")[0].strip().rstrip(",")
        if content:
            fields = next(csv.reader([content])) if "," in content else content.split()
            rows.append([float(f) for f in fields])
    return np.array(rows)


@pytest.mark.parametrize("block", [1, 7, 64, 2**18])
def test_the_reader_equals_pythons_csv_and_float_across_block_boundaries(tmp_path, monkeypatch, block):
    monkeypatch.setattr(data_files, "TEXT_BLOCK", block)
    path = tmp_path / "mixed.csv"
    path.write_bytes((MIXED * 40).encode())
    y = load_data_file(path)
    assert y.shape == (7 * 40, 3)
    np.testing.assert_array_equal(y, reference(MIXED * 40))
    column = np.random.default_rng(0).normal(size=500).tolist()
    (tmp_path / "column.txt").write_text("# y\n" + "".join(f"{v!r},\n" if i % 3 else f"{v!r}\n"
                                                           for i, v in enumerate(column)))
    np.testing.assert_array_equal(load_data_file(tmp_path / "column.txt"), column)


RSS_PROBE = """
import sys
from mogvae.data.files import load_data_file

def peak_rss():   # this process's own high-water mark (ru_maxrss starts at the forking parent's, pytest's)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024

before = peak_rss()
y = load_data_file(sys.argv[1])
print((peak_rss() - before) / y.nbytes, y.size, float(y.sum()))
"""


def test_reading_a_20_mb_file_takes_about_8_bytes_a_value(tmp_path):
    """10,485,760 one-digit rows, the most values a byte holds. Measured: the new reader's peak grew
    by 1.08x the values' float64 size; the line-by-line reader's (values, row numbers and a copy),
    3.1x. In a fresh process, so that the peak is this file's (Linux: /proc/self/status)."""
    n = 10 * 2**20
    digits = np.random.default_rng(0).integers(0, 10, n, dtype=np.uint8)
    text = np.empty(2 * n, np.uint8)
    text[0::2], text[1::2] = digits + ord("0"), ord("\n")
    (tmp_path / "digits.txt").write_bytes(text.tobytes())
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "digits.txt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratio, size, total = proc.stdout.split()
    assert int(size) == n and float(total) == digits.sum(dtype=np.int64)
    assert float(ratio) < 2.0


@pytest.mark.parametrize("content, needle", [
    ("# header\n\n0.1\n  # note\n\n0.2\nabc\n", "row 7: not a number ('abc')"),
    ("0.1,0.2\n# c\n0.3,0.4\n\n0.5,abc\n", "row 5, column 2: not a number ('abc')"),
    ("# c\n" + "0.1,0.2\n" * 300 + "0.3,0.4,0.5\n", "row 302: 3 values, but the first row has 2"),
    ("1\r\n# c\r\n2\r\nx\r\n", "row 4: not a number ('x')"),
    ("# c\n0.1\nnan\n\n0.2\ninf\n-inf\n", "row 3: nan is not finite (3 such rows)"),
    ("0.1\n" * 100 + "# c\n2e7\n" + "0.1\n" * 100 + "-3e7\n",
     "row 102: 2e+07 is beyond +-1e+06 (2 such rows); standardize the data first"),
    ("0.1\n# c\n" + "1" * 16_385 + "\n0.2\n", "row 3: longer than 16384 characters"),
    ("0.1\nabc\n" + "1" * 16_385 + "\n", "row 2: not a number ('abc')"),        # the first error wins
    ("0.1\n" * 3 + "2" * 20_000, "row 4: longer than 16384 characters"),        # no line end
    ("\n# c\n" + ",".join(["0"] * 1001) + "\n", "row 3: 1001 values; a data file has at most 1000 columns"),
])
@pytest.mark.parametrize("block", [1, 64, 2**18])
def test_refusals_name_the_row_past_comments_and_block_boundaries(tmp_path, monkeypatch, content, needle, block):
    monkeypatch.setattr(data_files, "TEXT_BLOCK", block)
    path = tmp_path / "y.csv"
    path.write_bytes(content.encode())
    with pytest.raises(DataError) as refused:
        load_data_file(path)
    assert str(refused.value) == f"{path}: {needle}"


FREE_A_BLOCK = """
import os, sys, torch
from mogvae.runs.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else False
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = torch.ones(5 << 20)          # 20 MiB, touched
held = resident()
del block
print(kept, (held - resident()) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_a_process_that_keeps_freed_memory_does_not_hand_a_freed_tensor_back_to_the_kernel():
    """runs/allocator.py: glibc, by default, unmaps a freed 20 MiB block (the next one is faulted in
    again, page by page); once told to keep freed memory it keeps it; and where the environment chooses
    malloc's thresholds itself (a Dask nanny's MALLOC_TRIM_THRESHOLD_), mogvae leaves them alone. Each
    case in a fresh process (malloc's thresholds are per process and move as it frees), with no malloc
    setting of this one's environment."""
    import os
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def returned(mode, **settings):
        out = subprocess.run([sys.executable, "-c", FREE_A_BLOCK, mode], capture_output=True, text=True, check=True,
                             env={**clean, **settings})
        kept, mib = out.stdout.split()
        return kept == "True", float(mib)

    kept, mib = returned("default")
    assert not kept and mib > 15
    kept, mib = returned("kept")
    assert kept and mib < 5
    kept, mib = returned("kept", MALLOC_TRIM_THRESHOLD_="65536")
    assert not kept and mib > 15
