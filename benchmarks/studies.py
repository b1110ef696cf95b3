"""End to end: `mogvae reproduce` and each built-in study, phase by phase (issue 20's targets).

Each command runs in a fresh folder in its own process, on this machine's defaults (workers and threads
as the command chooses them). From what the runs saved (status.json: train_seconds and
evaluation_seconds per phase) and from the clock:

  wall          the command, start to finish (training, evaluation and the report, runs in parallel)
  training      the runs' training wall time, summed over runs (their seeds train together)
  evaluation    the runs' evaluation wall time, summed over runs, and its costliest phase
  report        `mogvae report DIR` again on the finished folder, its figures kept (what a user re-runs)
  report, cold  the same with figures/ deleted: every figure drawn again

Sums over runs exceed the wall time where runs ran side by side. Results go to
benchmarks/results/studies.json (--quick: studies.quick.json, every command with --quick; with --only,
the commands timed replace their rows and the others are kept), and the table printed at the end is
the one docs/speed.md shows.

    python benchmarks/studies.py [--quick] [--only reproduce noise ...] [--keep DIR]

--keep DIR leaves each command's output folder in DIR/NAME (for its report and readings) instead of a
temporary folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {"reproduce": ["reproduce"], "noise": ["study", "noise"], "families": ["study", "families"],
            "dimension": ["study", "dimension"], "tabular": ["study", "tabular"]}
TARGETS_S = {"reproduce": 120, "noise": 12 * 60, "families": 25 * 60, "dimension": 20 * 60, "tabular": 20 * 60}
QUICK_TARGET_S = 60          # every study's --quick (issue 20), and 30 s for a report
REPORT_TARGET_S = 30
RESULTS = Path(__file__).parent / "results" / "studies.json"
QUICK_RESULTS = RESULTS.with_name("studies.quick.json")     # a smoke run never overwrites the real one


def _mogvae(*args: str) -> float:
    """Run `mogvae args` in its own process; its wall time in seconds (a failure stops the benchmark)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mogvae.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mogvae {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - start


def _saved_seconds(out: Path) -> dict:
    """Training and evaluation seconds summed over the folder's runs, from their status.json."""
    training, evaluation, phases = 0.0, 0.0, {}
    for status in sorted(out.glob("runs/*/status.json")):
        saved = json.loads(status.read_text())
        training += float(saved.get("train_seconds", 0.0))
        seconds = saved.get("evaluation_seconds", {})
        evaluation += float(seconds.get("total", 0.0))
        for phase, s in seconds.items():
            if phase != "total":
                phases[phase] = phases.get(phase, 0.0) + float(s)
    return {"runs": len(list(out.glob("runs/*/status.json"))), "training_s": training, "evaluation_s": evaluation,
            "evaluation_phases_s": phases}


def measure(name: str, quick: bool, work: Path) -> dict:
    out = work / name
    if out.exists():       # mogvae would resume a finished or half-done folder, and the timing would lie
        raise SystemExit(f"{out} exists: --keep needs a folder without {name}/ in it")
    wall = _mogvae(*COMMANDS[name], *(["--quick"] if quick else []), "--out", str(out))
    row = {"command": "mogvae " + " ".join(COMMANDS[name]) + (" --quick" if quick else ""), "wall_s": wall,
           **_saved_seconds(out)}
    for report in ("report.md", "report.html"):
        (out / report).unlink(missing_ok=True)
    row["report_s"] = _mogvae("report", str(out))
    shutil.rmtree(out / "figures")
    for report in ("report.md", "report.html"):
        (out / report).unlink(missing_ok=True)
    row["report_cold_s"] = _mogvae("report", str(out))
    row["target_s"] = QUICK_TARGET_S if quick else TARGETS_S[name]
    return row


def table(rows: dict[str, dict]) -> str:
    lines = ["| command | runs | wall | target | training (sum) | evaluation (sum) | costliest phase | report | report, cold |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        phases = row["evaluation_phases_s"]
        top = max(phases, key=phases.get) if phases else "-"
        met = "met" if row["wall_s"] <= row["target_s"] else f"missed by {row['wall_s'] / row['target_s']:.1f}x"
        lines.append(f"| `{row['command']}` | {row['runs']} | {row['wall_s']:.0f} s | {row['target_s']} s ({met}) | "
                     f"{row['training_s']:.0f} s | {row['evaluation_s']:.0f} s | {top} {phases.get(top, 0):.0f} s | "
                     f"{row['report_s']:.1f} s | {row['report_cold_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every command with --quick (a smoke run, ~3 min)")
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), help="these commands alone")
    parser.add_argument("--keep", type=Path, help="leave each output folder in KEEP/NAME")
    args = parser.parse_args(argv)
    results = QUICK_RESULTS if args.quick else RESULTS
    rows = {}
    with tempfile.TemporaryDirectory(prefix="mogvae-studies-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.only or list(COMMANDS):
            print(f"timing {name}{' --quick' if args.quick else ''} ...", flush=True)
            rows[name] = measure(name, args.quick, work)
            print(f"  {rows[name]['wall_s']:.0f} s", flush=True)
    import platform
    import os
    if args.only and results.exists():      # a re-timed command replaces its own row; the others' are kept
        rows = {**json.loads(results.read_text()).get("rows", {}), **rows}
    saved = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "quick": args.quick, "rows": rows}
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(saved, indent=1) + "\n")
    print(table(rows))
    print(f"saved: {results}")


if __name__ == "__main__":
    main()
