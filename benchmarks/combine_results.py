"""Combine the results.json of several runs of one eval grid on different items into one (results.json,
results.csv, plot), e.g. a RULER grid run one task per directory so that a long grid keeps what finished:

    python benchmarks/combine_results.py results/ruler4k-smollm2-all results/ruler4k-smollm2/*/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headprof.api import EvalReport
from headprof.errors import HeadprofError
from headprof.evaluation import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory")
    ap.add_argument("runs", nargs="+", help="directories (or results.json files) of the runs to combine")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    a = ap.parse_args()
    paths = [Path(p) / "results.json" if Path(p).is_dir() else Path(p) for p in a.runs]
    try:
        docs = []
        for p in paths:
            try:
                docs.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise HeadprofError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None
        results = evaluate.combine(docs)
        EvalReport(results).save(a.out, force=a.force)
    except HeadprofError as e:  # one line, exit 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {a.out}: {len(paths)} runs, {results['items']} items, {len(results['rows'])} rows")


if __name__ == "__main__":
    main()
