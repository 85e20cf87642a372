"""Wall time of the quick CLI paths: ``mtpeft --help`` and ``mtpeft bank ls BANK`` (which must load no torch).

    nice -n 10 python benchmarks/bench_cli_startup.py [--runs 7] [--tree DIR ...]

Each command runs ``--runs`` times in a fresh interpreter with ``PYTHONPATH`` at the tree measured (default:
this one); the median and min are written to ``benchmarks/results/cli_startup.json`` with whether torch was
imported. Several ``--tree`` (e.g. /work/main and this worktree) are measured interleaved, so background load
hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ("import sys; from mtpeft.cli import main\n"
       "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
       "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n")


def _bank(tmp: Path) -> Path:
    """A tiny bank, made with this tree's code (the manifest format is the same for both trees)."""
    d = tmp / "bank"
    code = ("import sys; from mtpeft.backbone import load_backbone; from mtpeft.bank import ModuleBank\n"
            "b = ModuleBank(load_backbone('tiny-bert', seed=0)); b.add('m0', 'lora', {'r': 2}); b.save(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(d)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   capture_output=True)
    return d


def _time(tree: str, argv: list[str]) -> tuple[float, bool]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUN, *argv], check=False, cwd=tree, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t, "TORCH True" in p.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tree", action="append", default=None)
    args = ap.parse_args()
    trees = args.tree or [str(ROOT)]
    with tempfile.TemporaryDirectory() as tmp:
        bank = _bank(Path(tmp))
        cmds = {"--help": ["--help"], "bank ls": ["bank", "ls", str(bank)]}
        times = {(t, c): [] for t in trees for c in cmds}
        torch_loaded = {}
        for _ in range(args.runs):
            for c, argv in cmds.items():
                for t in trees:
                    s, loaded = _time(t, argv)
                    times[(t, c)].append(s)
                    torch_loaded[(t, c)] = loaded
    rows = [{"tree": t, "command": f"mtpeft {c}", "median_s": round(statistics.median(v), 3),
             "min_s": round(min(v), 3), "runs": len(v), "imports_torch": torch_loaded[(t, c)]}
            for (t, c), v in times.items()]
    out = {"benchmark": "cli_startup", "python": sys.version.split()[0], "load_avg_1min": os.getloadavg()[0],
           "rows": rows}
    (ROOT / "benchmarks" / "results" / "cli_startup.json").write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{r['tree']:30s} {r['command']:18s} median {r['median_s']:.2f} s  min {r['min_s']:.2f} s  "
              f"torch {r['imports_torch']}")


if __name__ == "__main__":
    main()
