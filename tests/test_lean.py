import subprocess
import sys


def test_import_and_help_do_not_import_torch():
    code = ("import sys, vlmedge, vlmedge.cli; vlmedge.cli.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_help_teaches_every_command():
    p = subprocess.run([sys.executable, "-m", "vlmedge", "--help"], capture_output=True, text=True)
    assert p.returncode == 0
    for cmd in ("train", "eval", "prune", "distill", "export", "quantize", "compress", "recipes", "bench", "gate"):
        assert cmd in p.stdout
    p = subprocess.run([sys.executable, "-m", "vlmedge", "compress", "--help"], capture_output=True, text=True)
    assert "stages:" in p.stdout and "--set" in p.stdout
