"""The one trtexec command builder, for the `tensorrt` target and the board runner alike.

TensorRT versions differ in how precision is chosen, and vlmedge follows the ONNX it exported:
* TensorRT 11 builds strongly typed networks and removed `--fp16/--int8/--best`: no precision flag is passed;
  FP16 comes from the FP16 export, INT8 from the QDQ nodes of the static quantization stage.
* TensorRT 9.1-10 support `--stronglyTyped`, which gives the same behaviour: it is passed.
* TensorRT 8.x needs `--fp16` for an FP16 export and `--int8` (with `--fp16`) for a QDQ export.

Standard library only: the Jetson runner copies this file to the board.
"""

from __future__ import annotations

from pathlib import Path


class PrecisionError(ValueError):
    """The export's precision cannot be built by this TensorRT (the host turns it into a VlmedgeError)."""


def precision_flags(version: tuple[int, int], precision: str) -> list[str]:
    """trtexec flags that make the engine's precision the export's precision (fp32, fp16, int8-static, ...)."""
    if version[0] >= 11:
        return []
    if tuple(version) >= (9, 1):
        return ["--stronglyTyped"]
    if precision == "fp16":
        return ["--fp16"]
    if precision.startswith("int8"):
        if precision != "int8-static":
            raise PrecisionError(f"{precision} exports have no QDQ nodes; use the static quantization stage (QDQ) "
                                 "for TensorRT INT8")
        return ["--int8", "--fp16"]
    return []


def build_command(trtexec: str, onnx: Path, shapes: str, version: tuple[int, int], precision: str, *, warmup: int,
                  min_runs: int, min_seconds: float, engine: Path | None = None,
                  times: Path | None = None) -> list[str]:
    """Build (and save, with `engine`) an engine of one graph at fixed `shapes` and time it, trtexec-style."""
    cmd = [trtexec, f"--onnx={onnx}"]
    if engine is not None:
        cmd.append(f"--saveEngine={engine}")
    cmd += [f"--shapes={shapes}", *precision_flags(version, precision), f"--warmUp={max(200, warmup * 20)}",
            f"--iterations={min_runs}", f"--duration={max(1, int(min_seconds))}", "--percentile=50,90,99"]
    if times is not None:
        cmd.append(f"--exportTimes={times}")
    return cmd


def version_of(trtexec: str) -> tuple[int, int] | None:
    """(major, minor) from the `&&&& RUNNING TensorRT.trtexec [TensorRT vNNNN]` header of `trtexec --help`."""
    import subprocess

    try:
        from . import parsers
    except ImportError:  # in a bundle on the device
        import parsers  # type: ignore[no-redef]

    p = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60)
    version = parsers.trt_version(p.stdout + p.stderr)
    if not version:
        return None
    major, minor, _ = version.split(".")
    return int(major), int(minor)


def fixed_shapes(manifest: dict, graph: str, batch: int = 1) -> str:
    """trtexec's `--shapes` for one graph of an export folder: the manifest's declared inputs with the batch axis
    set to `batch` and the sequence axis to the export's `max_length`."""
    sizes = {"batch": batch, "sequence": manifest.get("max_length", 1)}
    return ",".join(f"{name}:" + "x".join(str(sizes.get(d, d)) for d in dims)
                    for name, dims in manifest["inputs"][graph].items())
