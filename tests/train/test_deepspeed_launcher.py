"""Multi-node as the README tells users to run it, on one machine: two `deepspeed --no_ssh --node_rank N`
launchers (one per "node", as on hosts without pdsh/ssh) form one job of world size 2 on CPU over gloo, and
train the same steps as two ranks started together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simvq_scale.train.checkpoint import TRAINER_STATE, tag_for
from tests.dist_utils import free_port, run_distributed
from tests.helpers import ROOT, clean_env, fit_worker, losses_by_step, tiny_overrides

DEEPSPEED = Path(sys.executable).with_name("deepspeed")


@pytest.mark.slow
def test_two_no_ssh_launchers_form_one_job_of_world_size_two(demo_data, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never contacts them
    out = tmp_path / "launchers"
    overrides = tiny_overrides(demo_data, out, "train.steps=2", "train.ckpt_every=2", "train.log_every=1")
    port = str(free_port())
    nodes = [subprocess.Popen([str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "image_demo.yaml"),
                               "--set", *overrides],
                              cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "step 2/2" in outputs[0]  # rank 0 runs under the node-0 launcher and logs
    tag = out / "ckpt" / "generator" / tag_for(2)
    assert json.loads((tag / TRAINER_STATE).read_text())["world_size"] == 2
    assert sorted(p.name for p in tag.glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]

    together = tmp_path / "together"
    run_distributed(fit_worker, 2, [(tiny_overrides(demo_data, together, "train.steps=2", "train.ckpt_every=2",
                                                    "train.log_every=1"), None)], timeout_s=600)
    expected, got = losses_by_step(together), losses_by_step(out)
    assert sorted(got) == [1, 2]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4)
