"""Peak memory of training on 1 WebDataset shard vs 20 shards of the same size: shards are indexed, not loaded.

Writes the shards (1000 JPEG samples each, 96 px) under DIR, then trains a tiny-width preset at 64 px for 200 steps
on each set in a fresh process and reads that process's peak RSS. Held decoded in memory, 20 shards at 64 px would
be 20000 x 12 KB = 246 MB more than 1 shard. Run from the repository root:

    python benchmarks/streaming_rss.py runs/streaming [--quick]

writes DIR/results.json. `--quick` (the suite's check of the script): 1 vs 2 shards of 20 samples, 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402
from test_user_data import _shards  # noqa: E402  (the test suite's shard writer)

PRESET = json.loads((ROOT / "vlmedge/models/presets/tiny.json").read_text())
PRESET["vision"]["image_size"] = PRESET["preprocess"]["image_size"] = 64
PRESET["description"] = "tiny at 64 px: the streaming memory benchmark"

MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def main(out: Path, many: int = 20, samples: int = 1000, steps: int = 200, batch: int = 64) -> int:
    run = Provenance.start()
    out.mkdir(parents=True, exist_ok=True)
    preset = out / "tiny64.json"
    preset.write_text(json.dumps(PRESET))
    sets = {1: out / "one", many: out / f"{many}-shards"}
    for n, folder in sets.items():
        if not (folder / f"shard-{n - 1:06d}.tar").is_file():
            _shards(folder, n, samples, size=96)
    results = {}
    for n, folder in sets.items():
        model = out / f"model-{n}"
        subprocess.run(["rm", "-rf", str(model)], check=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "vlmedge", "train", "--preset",
                            str(preset), "--data", str(folder), "--data-count", "100000", "--steps", str(steps),
                            "--batch-size", str(batch), "--out", str(model), "--quiet"],
                           check=True, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results[n] = {"shards": n, "samples": n * samples, "peak_rss_mb": int(p.stdout.split()[-1]) / 1024,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{n:2d} shard(s), {n * samples} samples: peak RSS {results[n]['peak_rss_mb']:.0f} MB, "
              f"{results[n]['seconds']} s", flush=True)
    ratio = results[many]["peak_rss_mb"] / results[1]["peak_rss_mb"]
    print(f"{many} shards / 1 shard peak RSS: {ratio:.3f}")
    run.write(out / "results.json", {"runs": list(results.values()), f"ratio_{many}_to_1": ratio})
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/streaming"))
    ap.add_argument("--quick", action="store_true", help="1 vs 2 shards of 20 samples, 3 steps: checks the script")
    a = ap.parse_args()
    sys.exit(main(a.out, *((2, 20, 3, 8) if a.quick else ())))
