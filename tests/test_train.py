import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from vlmedge.errors import VlmedgeError
from vlmedge.train import TrainConfig, train

TINY = dict(preset="tiny", batch_size=64, data_count=512, lr=3e-3, warmup_steps=5)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(tmp_path):
    summary = train(TrainConfig(steps=100, **TINY), tmp_path / "m", progress=False)
    losses = _losses(tmp_path / "m")
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert summary["precision"] == "fp32" and (tmp_path / "m" / "config.json").is_file()


def test_resume_gives_the_same_next_step_loss(tmp_path):
    cfg = TrainConfig(steps=6, checkpoint_every=3, **TINY)
    train(cfg, tmp_path / "full", progress=False)
    full = _losses(tmp_path / "full")

    def crash(step, loss):  # a crash after step 4: only the checkpoint at step 3 survives
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "cut", progress=False, on_step=crash)
    assert not (tmp_path / "cut" / "config.json").exists()  # an interrupted run does not look finished
    summary = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert summary["resumed_from"] == 3
    resumed = _losses(tmp_path / "cut")
    assert resumed[3] == pytest.approx(full[3], abs=1e-5)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    def interrupt(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(VlmedgeError, match="--resume"):
        train(TrainConfig(steps=4, **TINY), tmp_path / "m", progress=False, on_step=interrupt)
    meta = json.loads((tmp_path / "m" / "checkpoints" / "last" / "trainer.json").read_text())
    assert meta["step"] == 2


def test_bad_training_settings(tmp_path):
    with pytest.raises(VlmedgeError, match="precision=bf16 on CPU"):
        train(TrainConfig(steps=2, precision="bf16", **TINY), tmp_path / "a", progress=False)
    with pytest.raises(VlmedgeError, match="grad_accum"):
        train(TrainConfig(steps=2, grad_accum=0, **TINY), tmp_path / "b", progress=False)
    with pytest.raises(VlmedgeError, match="nothing to resume"):
        train(TrainConfig(steps=2, **TINY), tmp_path / "c", resume=True, progress=False)


def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo, all-gathered embeddings) == 1 process on the same global batch."""
    args = ["train", "--preset", "tiny", "--steps", "3", "--batch-size", "16", "--data-count", "256",
            "--lr", "3e-3", "--warmup-steps", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun binds a free port itself (a port picked beforehand can be taken by the time it binds)
    def torchrun(out):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "vlmedge", *args, "--out", str(out)], capture_output=True, text=True, env=env,
                              timeout=300)

    ddp = torchrun(tmp_path / "ddp")
    if ddp.returncode != 0 and "SIGABRT" in ddp.stderr:
        # CI once saw a rank killed by gloo's C++ abort (not a Python error; never reproduced here, 20 runs, loaded
        # and idle); one retry into a fresh folder keeps the test about DDP's arithmetic, a second abort still fails
        print("first torchrun run aborted by a signal; retrying once:\n" + ddp.stderr[-1500:], file=sys.stderr)
        shutil.rmtree(tmp_path / "ddp", ignore_errors=True)
        ddp = torchrun(tmp_path / "ddp")
    # torchrun's own traceback fills the tail; the ranks' first complaints (a C++ 'terminate ... what():', a Python
    # error) come earlier, so show those too
    cause = [line for line in ddp.stderr.splitlines() if re.search(r"terminate|what\(\)|Error|error:", line)][:12]
    assert ddp.returncode == 0, "\n".join(cause) + "\n...\n" + ddp.stderr[-1500:]
    single = subprocess.run([sys.executable, "-m", "vlmedge", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert max(float(np.abs(a[k].numpy() - b[k].numpy()).max()) for k in a) < 1e-4
    assert json.loads((tmp_path / "ddp" / "train_summary.json").read_text())["world_size"] == 2
