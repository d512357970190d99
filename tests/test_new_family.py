"""What a new model family costs: one package that registers a `Family` overriding only what it has (here `load`:
a do-nothing family), and the stages run it through their one path: a model folder of its architecture is
recorded (family, parameters, files) by `stages.execute`; what it lacks is a one-line error naming the family,
from the command that needs it."""

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from vlmedge import families
from vlmedge.artifact import Artifact
from vlmedge.cli import main
from vlmedge.stages import Context, ModelSpec, execute

PACKAGE = '''
"""A family with nothing but a loader: one package, one registration."""
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from vlmedge.families import Family, register


class Nothing(Family):
    name = "nothing"
    architectures = ("NothingModel",)

    def load(self, path, *, attn_implementation="sdpa"):
        model = torch.nn.Linear(4, 3)
        model.load_state_dict(load_file(f"{path}/model.safetensors"))
        return SimpleNamespace(model=model)


register(Nothing())
'''


@pytest.fixture
def nothing_family(tmp_path, monkeypatch):
    package = tmp_path / "site" / "nothing_family"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entries = families._REGISTRY.all()
    __import__("nothing_family")
    yield families.get("nothing")
    entries.pop("nothing", None)
    sys.modules.pop("nothing_family", None)


def _folder(path):
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["NothingModel"]}')
    layer = torch.nn.Linear(4, 3)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path / "model.safetensors"))
    return path


def test_a_family_that_only_loads_is_recorded_by_the_stages_and_names_what_it_lacks(nothing_family, tmp_path,
                                                                                      capsys):
    folder = _folder(tmp_path / "model")
    assert families.of(folder) is nothing_family
    art = execute(ModelSpec(path=str(folder)), None, Context(eval=None), tmp_path / "step")
    assert (art.family, art.parameters, art.flops) == ("nothing", 15, {})
    assert Artifact.load(tmp_path / "step").family == "nothing"
    with pytest.raises(Exception, match="FrozenInstanceError|cannot assign"):
        art.family = "generative"  # the record is frozen: its family was resolved once, when it was made

    code = main(["export", str(folder), "--out", str(tmp_path / "onnx"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == "error: the nothing family cannot be exported", err
    assert not (tmp_path / "onnx" / "manifest.json").exists()
    code = main(["eval", str(folder), "--data", "shapes:16", "--json"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: the nothing family cannot open"), err
