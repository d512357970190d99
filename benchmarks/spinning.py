"""ONNX Runtime's threads spin-waiting within a run (vlmedge's default) against sleeping between operators, on export
folders of any family, in interleaved rounds in one process.

Every session vlmedge opens stops its threads' spinning when a run ends (`session.force_spinning_stop`), so a model's
sessions (vision, embed, decoder; image, text) cannot stall each other after their runs; `measure.SPINNING` says
whether they spin within one. Per round and folder, the family's own ONNX Runtime scenarios (`onnx_latency`: what
`vlmedge bench --target cpu` times) are timed once with spinning off and once on, each on sessions opened with that
setting; the rounds are pooled as the bench pools them (medians).

    python benchmarks/spinning.py FOLDER [FOLDER ...] [--rounds 3] [--threads 2] [--out FILE] [--quick]

Writes FILE (default: spinning.json in the first folder): per folder and setting the scenarios' p50 / p90 ms and
the ratio spinning on / off. Generative folders are timed on one global frame (`image_splitting: off`). `--quick`
(the suite's check): 1 round, 3 runs per scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402

SETTINGS = {"off": False, "on": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="export folders (vlmedge export / quantize)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (off, on)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every session")
    ap.add_argument("--out", type=Path, help="results file (default: FOLDER/spinning.json of the first folder)")
    ap.add_argument("--quick", action="store_true", help="1 round, 3 runs per scenario: checks the script")
    a = ap.parse_args()
    run = Provenance.start()
    from vlmedge import families
    from vlmedge.runtime import measure

    rounds = 1 if a.quick else a.rounds
    cfg = {"warmup": 1 if a.quick else 3, "min_runs": 3 if a.quick else 15, "min_seconds": 0.0 if a.quick else 1.0,
           "threads": a.threads}
    records: dict[str, dict[str, list]] = {str(f): {s: [] for s in SETTINGS} for f in a.folders}
    for r in range(rounds):
        for folder in a.folders:
            family = families.of(folder)
            values = {**cfg, **({"image_splitting": "off"} if family.name == "generative" else {})}
            config = families.configure(measure.MeasureConfig, values, family)
            for setting, spin in SETTINGS.items():
                print(f"round {r + 1}/{rounds}: {folder} spinning {setting}", flush=True)
                measure.SPINNING = spin  # read by every session opened from here on
                records[str(folder)][setting].append(family.onnx_latency(folder, config, ["CPUExecutionProvider"]))
    results: dict = {"threads": a.threads, "rounds": rounds, "quick": a.quick, "folders": {}}
    for folder, by_setting in records.items():
        pooled = {s: measure.pool_rounds(recs) for s, recs in by_setting.items()}
        scenarios = [k for k, v in pooled["off"].items()  # the latency scenarios (throughput has no p90)
                     if isinstance(v, dict) and all(isinstance(v.get(q), float) for q in ("p50_ms", "p90_ms"))]
        results["folders"][folder] = {
            "family": families.of(Path(folder)).name, "precision": pooled["off"].get("precision"),
            **{s: {k: {q: round(p[k][q], 3) for q in ("p50_ms", "p90_ms")} for k in scenarios}
               for s, p in pooled.items()},
            "on_vs_off_p50": {k: round(pooled["on"][k]["p50_ms"] / pooled["off"][k]["p50_ms"], 3) for k in scenarios},
            "on_vs_off_p90": {k: round(pooled["on"][k]["p90_ms"] / pooled["off"][k]["p90_ms"], 3) for k in scenarios}}
    out = a.out or a.folders[0] / "spinning.json"
    full = run.write(out, results)
    print(json.dumps({k: v for k, v in full.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
