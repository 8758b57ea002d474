"""The collapse demo (simvq-collapse-demo) end to end, in-process at small sizes: SimVQ uses more of its codebook
than VQ."""

import json

import pytest

from simvq_scale.tools import collapse_demo


@pytest.fixture(scope="module")
def demo():
    return collapse_demo


def run(demo, capsys, quantizer: str) -> dict:
    demo.main(["--quantizer", quantizer, "--codebook-size", "512", "--dim", "8", "--steps", "60",
               "--batch", "512", "--log-every", "20", "--seed", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) >= 4 and lines[1].startswith("step")  # progress while it runs
    return json.loads(lines[-1])


def test_simvq_keeps_more_codes_alive_than_vanilla_vq(demo, capsys):
    simvq, vq = run(demo, capsys, "simvq"), run(demo, capsys, "vq")
    for result, kind in ((simvq, "simvq"), (vq, "vq")):
        assert result["quantizer"] == kind and result["codebook_size"] == 512 and result["steps"] == 60
        assert 0 < result["utilization"] <= 1 and result["perplexity"] >= 1
    assert simvq["utilization"] > vq["utilization"] + 0.2, (simvq, vq)


def test_plot_is_written(demo, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fsq.png"
    demo.main(["--quantizer", "fsq", "--codebook-size", "64", "--dim", "4", "--steps", "5", "--batch", "64",
               "--log-every", "5", "--plot", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["codebook_size"] == 64
    assert out.stat().st_size > 1000
