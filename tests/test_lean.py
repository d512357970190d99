import subprocess
import sys


def test_import_and_help_do_not_import_torch():
    code = ("import sys, vlmedge, vlmedge.cli; vlmedge.cli.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'tensorrt') if m in sys.modules]; "
            "print(heavy); assert not heavy, heavy")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _subcommands():
    import argparse

    from vlmedge.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_is_listed_and_teaches_by_example():
    commands = _subcommands()
    assert set(commands) == {"train", "eval", "prune", "distill", "export", "quantize", "compress", "recipes",
                             "bench", "gate"}
    top = subprocess.run([sys.executable, "-m", "vlmedge", "--help"], capture_output=True, text=True).stdout
    for name, parser in commands.items():
        assert parser.description or name == "recipes", name
        if name != "recipes":
            assert f"vlmedge {name} " in (parser.epilog or ""), f"{name} --help has no example"
        assert f"    {name}" in top or f"  {name} " in top, f"{name} missing from vlmedge --help"
        assert "usage:" in parser.format_help()  # every help text renders (argparse %-formats it)


def test_stage_flags_have_the_stage_configs_defaults():
    """The stage dataclasses are the one source of defaults: every field has a flag, and a command given no flags
    builds exactly the dataclass's default config."""
    import dataclasses

    from vlmedge import families
    from vlmedge.cli import EXPORT_FLAGS, QUANTIZE_FLAGS, _config, build_parser
    from vlmedge.evaluate import EvalConfig
    from vlmedge.stages.export import ExportConfig
    from vlmedge.stages.prune import PruneConfig
    from vlmedge.stages.quantize import QuantizeConfig
    from vlmedge.train import DistillStage, TrainStage

    run_data = {"data": None}  # prune's and quantize's data: the command's --data, given to the stage as the run's
    cases = [(["train", "--out", "o"], TrainStage, {}, {}),
             (["distill", "s", "--teacher", "t", "--out", "o"], DistillStage, {}, {}),
             (["eval", "p"], EvalConfig, {}, {}), (["export", "m", "--out", "o"], ExportConfig, EXPORT_FLAGS, {}),
             (["quantize", "m", "--out", "o"], QuantizeConfig, QUANTIZE_FLAGS, run_data),
             (["prune", "m", "--out", "o"], PruneConfig, {}, run_data)]
    commands = _subcommands()
    for argv, cls, rename, fixed in cases:
        dests = {a.dest for a in commands[argv[0]]._actions}
        owners = [cls, *families.options_of(getattr(cls, "SECTION", "")).values()]  # and each family's own settings
        for f in (f for c in owners for f in dataclasses.fields(c)):
            # `data` of prune and quantize is the command's --data (the run's data); `options` are the family's
            assert rename.get(f.name, f.name) in dests or f.name in ("data", "options"), \
                f"{argv[0]}: no flag for {f.name}"
        args = build_parser().parse_args(argv)
        if argv[0] == "prune":
            for name in (f"{t}_{k}" for t in ("vision", "text") for k in ("heads", "mlp", "layers")):
                setattr(args, name, getattr(args, name.split("_")[1]))  # as cmd_prune does
        assert _config(cls, args, rename, **fixed) == cls(), argv[0]
