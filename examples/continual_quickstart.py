"""The quickstart (`make demo`): learn the five tweet domains one after another on MiniLM + LoRA and compare
fine-tuning in sequence, experience replay, one expert per task picked by a router, and joint training.

Everything runs offline on the shipped backbone and data, on CPU. The run's settings are
configs/continual-demo.yaml (the file `mtpeft continual --config` takes); the run directory
(runs/continual-demo by default) gets the states, report.json, report.md and the plots. Run it again and it
continues (or just re-reports) what is there; --fresh starts over in a new directory name.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mtpeft.continual import load_config, run_continual, summary_table

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "continual-demo.yaml"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--out", type=Path, default=Path("runs/continual-demo"))
    p.add_argument("--strategies", default=None, help="comma-separated (default: the config's compare list)")
    p.add_argument("--fresh", action="store_true", help="a new run directory (OUT-<time>) instead of resuming OUT")
    args = p.parse_args(argv)
    conf = load_config(args.config)
    strategies = args.strategies.split(",") if args.strategies else conf["compare"]
    out = args.out.with_name(f"{args.out.name}-{time.strftime('%Y%m%d-%H%M%S')}") if args.fresh else args.out
    command = f"mtpeft continual --config {args.config} --out {out} --compare {','.join(strategies)}"
    t0 = time.perf_counter()
    report = run_continual(conf, out, strategies, conf["seeds"], resume=True, command=command,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"\n{report['stream']} ({report['scenario']}), {len(report['tasks'])} tasks, seeds {report['seeds']}: "
          "metrics in percentage points")
    print(summary_table(report))
    print(f"\nreport: {out / 'report.md'}; plots: {out / 'plots'}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
