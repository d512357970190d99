"""Which kernels ONNX Runtime's INT8 GEMMs run on this CPU (issue 43, point 3: every INT8 GEMM on the u8s8 kernel,
AMX where the CPU has it, VNNI otherwise, none on a portable one).

ONNX Runtime's profile names the operator (DynamicQuantizeMatMul, MatMulInteger), not the MLAS kernel under it,
and its library carries no symbols. So `vlmedge bench FOLDER --profile` (ONNX Runtime's per-op-type kernel time of
each graph on real feeds) runs under `perf record` (cpu-clock samples), and each sampled address in ONNX Runtime's
library is classed by the integer dot-product instructions within WINDOW bytes of it (objdump): `amx` (tileloadd,
tdpbusd: the AMX u8s8 kernel), `vnni` (vpdpbusd: AVX-512 or AVX VNNI), `avx2-u8s8` (vpmaddubsw: the u8s8 kernel of
a CPU without VNNI, whose 16-bit sums can saturate; other int8 code of MLAS uses it too) or `other` (every other
operator, fp32 GEMMs, the quantization of activations, packing). A u8s8 MatMulInteger alone at the vision MLP's
shape is sampled first: what an int8 GEMM's samples look like on this CPU. The int8 operators' share of the
profile beside the `amx` share of the samples says how much of the time the AMX kernel is.

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
WINDOW = 64
"""Bytes of code either side of a sampled address searched for a class's instructions (a GEMM kernel's inner loop
is a few dozen bytes around its dot products; a wider window reaches into neighbouring functions, such as the copy
loops MLAS packs with)."""


def ort_library() -> Path:
    """The shared object holding ONNX Runtime's kernels (the Python wheel links them into its extension)."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    found = sorted(capi.glob("onnxruntime_pybind11_state*.so")) + sorted(capi.glob("libonnxruntime.so*"))
    return found[0]


def record(command: list[str], data: Path) -> str | None:
    """`command` run under perf record (cpu-clock samples into `data`); None, or why it could not be."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (apt install linux-perf)"
    if shutil.which("objdump") is None:  # what classes the samples
        return "objdump is not installed (apt install binutils)"
    p = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-F", "997", "-o", str(data), "--", *command],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode or not data.is_file():
        return f"perf record failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def disassemble(library: Path, addresses: list[int]) -> list[tuple[int, str]]:
    """(address, instruction) of the code around `addresses`, sorted: one objdump per cluster of nearby ones."""
    code: list[tuple[int, str]] = []
    clusters: list[list[int]] = []
    for a in sorted(addresses):
        if clusters and a - clusters[-1][-1] <= 4096:
            clusters[-1].append(a)
        else:
            clusters.append([a])
    for c in clusters:
        text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={c[0] - WINDOW:#x}",
                               f"--stop-address={c[-1] + WINDOW:#x}", str(library)], capture_output=True,
                              text=True).stdout
        for line in text.splitlines():
            m = re.match(r"\s*([0-9a-f]+):\s+(\S.*)", line)
            if m:
                code.append((int(m.group(1), 16), m.group(2)))
    return sorted(code)


def classify(data: Path, library: Path) -> dict:
    """Samples per class among ONNX Runtime's; the hottest addresses with what classed them."""
    import bisect

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
    addresses = [int(w, 16) for _, w in ours if w.startswith("0x")]
    code = disassemble(library, addresses) if addresses else []
    starts = [a for a, _ in code]
    counts: Counter = Counter({k: 0 for k in (*CLASSES, "other")})  # a class without a sample shows its 0
    hot = []
    for n, where in ours:
        kind, mark = "other", ""
        if where.startswith("0x"):  # a named symbol (an exported function) is no GEMM kernel
            a = int(where, 16)
            near = " ".join(ins for _, ins in code[bisect.bisect_left(starts, a - WINDOW):
                                                   bisect.bisect_right(starts, a + WINDOW)])
            for name, pattern in CLASSES.items():
                found = pattern.search(near)
                if found:
                    kind, mark = name, found.group(0)
                    break
        counts[kind] += n
        if len(hot) < 12 or kind in ("vnni", "avx2-u8s8"):  # every address of a kernel other than AMX's kept
            hot.append({"address": where, "samples": n, "class": kind, "instruction": mark})
    in_ort = sum(n for n, _ in ours)
    return {"samples": total, "onnxruntime_samples": in_ort,
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
    """The flags that say which u8s8 kernel MLAS can pick (vlmedge's `cpu_info` reads them)."""
    from vlmedge.runtime.measure import cpu_info

    return sorted(f for f in cpu_info()[1] if f.startswith(("amx", "avx512_vnni", "avx_vnni", "avx2")))


def main(folder: Path, min_runs: int, gemm_seconds: float) -> int:
    run = Provenance.start()
    profile, data = folder / "kernels-profile.json", folder / "kernels.perf.data"
    results: dict = {"folder": str(folder), "cpu_flags": cpu_flags()}
    bench = [sys.executable, "-m", "vlmedge", "bench", str(folder), "--profile", "--min-runs", str(min_runs),
             "--json", str(profile)]
    # the reference: a u8s8 MatMulInteger alone at the vision MLP's shape (what an int8 GEMM's samples look like here)
    why = record([sys.executable, "-c", "import sys; sys.path.insert(0, 'benchmarks'); from ceilings import gemm; "
                  f"print(gemm(1024, 768, 3072, 2, {gemm_seconds}, ('int8_gops',)))"], data)
    if why is None:
        results["reference_u8s8_gemm"] = classify(data, ort_library())
        why = record(bench, data)
    if why is None:
        results.update(classify(data, ort_library()))
    else:
        results["samples_left_out"] = why
        subprocess.run(bench, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    data.unlink(missing_ok=True)
    results["profile"] = op_split(profile)
    run.write(folder / "kernels.json", results)
    print(json.dumps({k: v for k, v in results.items() if k != "hottest"}, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--min-runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="2 runs per graph (the suite's check)")
    a = ap.parse_args()
    sys.exit(main(a.folder, 2 if a.quick else a.min_runs, 0.2 if a.quick else 3.0))
