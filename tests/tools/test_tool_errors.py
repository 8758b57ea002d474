"""The tools that read an export answer a user's mistake as the trainer does: one `error:` line naming the path
or setting, no traceback, and the README's exit code (6: no export or a refused one, 3: no data, 2: a config
the installed package cannot read)."""

import subprocess
import sys

import pytest
import torch

from simvq_scale.inference import EXPORT_NAME
from tests.helpers import clean_env, one_error, tiny_export

TOOLS = {  # each tool's arguments besides --checkpoint, for an output under OUT
    "eval_recon": ["--data", "{data}"],
    "export_tokens": ["--data", "{data}", "--out", "{out}/tokens"],
    "codebook_report": ["--data", "{data}", "--out", "{out}/report"],
    "reconstruct": ["--out", "{out}/recon", "{input}"],
}


def run(tool, checkpoint, data, tmp_path, input_file="x.png"):
    args = [a.format(data=data, out=tmp_path, input=input_file) for a in TOOLS[tool]]
    return subprocess.run([sys.executable, "-m", f"simvq_scale.tools.{tool}", "--checkpoint", str(checkpoint),
                           *args], capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_missing_export_is_one_line_with_exit_code_6(tool, demo_data, tmp_path):
    line = one_error(run(tool, tmp_path / "nothere", demo_data["image_val"], tmp_path), 6)
    assert f"--checkpoint: {tmp_path / 'nothere'} does not exist" in line


@pytest.mark.slow
def test_data_matching_nothing_and_an_unreadable_export_config(demo_data, tmp_path):
    run_dir = tiny_export("image", tmp_path / "run")
    line = one_error(run("eval_recon", run_dir, str(tmp_path / "none-*.tar"), tmp_path), 3)
    assert "none-*.tar' matches no file" in line
    # an export whose config holds a key this version does not know (made by another version)
    export = torch.load(run_dir / EXPORT_NAME, weights_only=True)
    export["config"]["quantizer"]["simvq"]["no_such_option"] = True
    torch.save(export, run_dir / EXPORT_NAME)
    line = one_error(run("eval_recon", run_dir, demo_data["image_val"], tmp_path), 2)
    assert f"{run_dir / EXPORT_NAME}: unknown config key 'quantizer.simvq.no_such_option'" in line
