"""Which kernels ONNX Runtime's INT8 GEMMs run on this CPU (issue 43, point 3: every INT8 GEMM on the u8s8 kernel,
AMX where the CPU has it, VNNI otherwise, none on a portable one).

ONNX Runtime's profile names the operator (DynamicQuantizeMatMul, MatMulInteger), not the MLAS kernel under it,
and its library carries no symbols. So `vlmedge bench FOLDER --profile` (ONNX Runtime's per-op-type kernel time of
each graph on real feeds) runs under `perf record` (cpu-clock samples), and each sampled address in ONNX Runtime's
library is classed by the integer dot-product instructions of the code around it (objdump, 192 bytes before and 64
after): `amx` (tileloadd, tdpbusd: the AMX u8s8 kernel), `vnni` (vpdpbusd: AVX-512 or AVX VNNI), `avx2-u8s8`
(vpmaddubsw: the u8s8 kernel of a CPU without VNNI, whose 16-bit sums can saturate) or `other` (every other
operator, fp32 GEMMs, the quantization of activations). On an AMX CPU no `vnni` or `avx2-u8s8` sample means no
INT8 GEMM fell back; the int8 operators' share of the profile beside the `amx` share of the samples says how much
of the time the AMX kernel is.

    python benchmarks/int8_kernels.py FOLDER [--min-runs 20] [--quick]

FOLDER: an INT8 export (`vlmedge quantize --mode dynamic`). Writes FOLDER/kernels.json: the CPU's flags, each class's
samples and share of ONNX Runtime's, the hottest addresses and every `vnni` or `avx2-u8s8` one with the instruction
that classed it (an instruction near a sampled address need not be a GEMM's: the addresses are there to look at with
objdump), and per graph and feed the profile's op types (the int8 GEMM operators' share). Without perf, or where it
may not sample, the samples are left out and the results say why. `--quick` (the suite's check): 2 runs per graph.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402

CLASSES = {"amx": re.compile(r"\b(tileloadd|tileloaddt1|tdpbusd|tdpbssd|tdpbsud|tdpbuud)\b"),
           "vnni": re.compile(r"\b(vpdpbusds?|vpdpwssds?)\b"),
           "avx2-u8s8": re.compile(r"\bvpmaddubsw\b")}
"""Instruction classes in order of precedence (the first found around an address classes it)."""
INT8_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
            "ConvInteger", "QLinearConv", "QAttention")
HOT = 200
"""Addresses disassembled (the most sampled); the rest of ONNX Runtime's samples count as `unclassed`."""


def ort_library() -> Path:
    """The shared object holding ONNX Runtime's kernels (the Python wheel links them into its extension)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("onnxruntime_pybind11_state*.so")) + sorted(capi.glob("libonnxruntime.so*"))
    return found[0]


def sample(folder: Path, out: Path, min_runs: int) -> tuple[str | None, Path]:
    """`vlmedge bench FOLDER --profile` under perf record; (why not, or None; the profile written)."""
    profile = out / "kernels-profile.json"
    bench = [sys.executable, "-m", "vlmedge", "bench", str(folder), "--profile", "--min-runs", str(min_runs),
             "--json", str(profile)]
    perf = shutil.which("perf")
    data = out / "kernels.perf.data"
    if perf is None:
        subprocess.run(bench, cwd=ROOT, check=True)
        return "perf is not installed (apt install linux-perf)", profile
    p = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-F", "997", "-o", str(data), "--", *bench],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode or not data.is_file():
        subprocess.run(bench, cwd=ROOT, check=True)
        return f"perf record failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}", profile
    return None, profile


def classify(data: Path, library: Path) -> dict:
    """Samples per class among ONNX Runtime's; the hottest addresses with what classed them."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-n", "--sort", "dso,sym",
                             "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    total, ours = 0, []
    for line in report.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[\.\]\s+(\S+)", line)
        if not m:
            continue
        total += int(m.group(1))
        if m.group(2) == library.name:
            ours.append((int(m.group(1)), m.group(3)))
    ours.sort(reverse=True)
    counts: Counter = Counter()
    hot = []
    for n, where in ours[:HOT]:
        if not where.startswith("0x"):  # a named symbol (an exported function): not a GEMM kernel
            counts["other"] += n
            continue
        address = int(where, 16)
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={address - 192:#x}",
                               f"--stop-address={address + 64:#x}", str(library)], capture_output=True,
                              text=True).stdout
        kind, mark = "other", ""
        for name, pattern in CLASSES.items():
            found = pattern.search(text)
            if found:
                kind, mark = name, found.group(0)
                break
        counts[kind] += n
        if len(hot) < 12 or kind in ("vnni", "avx2-u8s8"):  # every address of a kernel other than AMX's kept
            hot.append({"address": where, "samples": n, "class": kind, "instruction": mark})
    counts["unclassed"] = sum(n for n, _ in ours[HOT:])
    in_ort = sum(n for n, _ in ours)
    return {"samples": total, "onnxruntime_samples": in_ort, "addresses_classed": min(len(ours), HOT),
            "classes": {k: {"samples": v, "share_of_onnxruntime": round(v / max(in_ort, 1), 4)}
                        for k, v in sorted(counts.items())}, "hottest": hot}


def op_split(profile: Path) -> dict:
    """Per graph and feed of `vlmedge bench --profile`: the int8 GEMM operators' share of ONNX Runtime's kernel time
    and the op types that take the most."""
    out = {}
    for label, rows in json.loads(profile.read_text()).items():
        out[label] = {"kernel_ms": round(sum(r["ms_per_run"] for r in rows), 3),
                      "int8_gemm_share": round(sum(r["share"] for r in rows if r["op_type"] in INT8_OPS), 4),
                      "op_types": {r["op_type"]: round(r["share"], 4) for r in rows[:6]}}
    return out


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return sorted(f for f in flags if f.startswith(("amx", "avx512_vnni", "avx_vnni", "avx2")))


def main(folder: Path, min_runs: int) -> int:
    run = Provenance.start()
    why, profile = sample(folder, folder, min_runs)
    results = {"folder": str(folder), "cpu_flags": cpu_flags(), "profile": op_split(profile)}
    if why:
        results["samples_left_out"] = why
    else:
        results.update(classify(folder / "kernels.perf.data", ort_library()))
        (folder / "kernels.perf.data").unlink()
    run.write(folder / "kernels.json", results)
    print(json.dumps({k: v for k, v in results.items() if k != "hottest"}, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="2 runs per graph (the suite's check)")
    a = ap.parse_args()
    sys.exit(main(a.folder, 2 if a.quick else a.min_runs))
