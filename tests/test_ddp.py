"""Two-process DistributedDataParallel training on the CPU (gloo), started by torchrun."""

import json
import os
import subprocess
import sys

import torch

from fastmask.engine.checkpoint import load_checkpoint

# Long enough for two cold interpreters on a loaded 2-core machine; the run itself takes seconds.
DDP_TIMEOUT_S = 300


def test_two_process_gloo_training(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastmask.train", "--config", "smoke", "--set", f"output_dir={out}", "device=cpu",
           f"data.synthetic.cache_dir={tmp_path / 'cache'}", "solver.max_iter=3", "checkpoint_period=2",
           "data.batch_size=1", "num_threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the model runs on the torch backend here either way
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DDP_TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log and "2 image(s) per iteration" in log
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["iteration"] == 3
    assert len(ckpt["rng"]) == 2  # each rank's generators, for an exact resume
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "train"] == [1, 2, 3]  # rank 0 alone writes
    result = json.loads((out / "eval.json").read_text())
    assert result["num_images"] == 4  # both ranks' shares of the validation set were gathered
