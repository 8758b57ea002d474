"""The package on its own: `--config` names a packaged config from any directory; and (slow) the wheel built from
this checkout (`pip wheel --no-deps`), installed into a fresh folder outside it (`pip install --no-deps --target`)
and used from another directory with only that folder on the path (this environment gives the dependencies):
every module of simvq_scale imports from there, every command answers --help, and the installed
`simvq-make-demo-data`, `simvq-train --config image_demo --dry-run` and `simvq-compare-quantizers` (whose runs are
`python -m` children) run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simvq_scale.config import PACKAGED_CONFIGS, ConfigError, config_file, load_config
from tests.helpers import OFFLINE_EVAL, ROOT, TINY_COMPARISON, clean_env

# what a build must not see: a stale build/ of an earlier in-tree build would put removed modules into the wheel
NOT_BUILD_INPUTS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                          ".pytest_cache", "runs", "demo_data")


def test_a_bare_name_reads_the_packaged_config_and_a_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = PACKAGED_CONFIGS / "audio_262k.yaml"
    assert config_file("audio_262k") == config_file("audio_262k.yaml") == packaged
    assert load_config("audio_262k").quantizer.codebook_size == yaml.safe_load(packaged.read_text())["quantizer"][
        "codebook_size"]
    # a file of that name in the working directory is a path, and a path wins
    Path("audio_262k.yaml").write_text("quantizer: {codebook_size: 64}\n")
    assert config_file("audio_262k.yaml") == Path("audio_262k.yaml")
    assert load_config("audio_262k.yaml").quantizer.codebook_size == 64
    assert config_file("audio_262k") == packaged  # no file `audio_262k` here: still the packaged one
    # a path with a folder is never looked up among the packaged configs
    with pytest.raises(ConfigError, match=r"cannot read config file configs/image_demo.yaml: .*or name a packaged "
                                          r"config: .*image_demo"):
        load_config("configs/image_demo.yaml")
    # the checkout's configs/ is the packaged folder itself, not a copy
    assert (ROOT / "configs").resolve() == PACKAGED_CONFIGS.resolve()


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout installed into a fresh folder: that folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_BUILD_INPUTS)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(source), "-w", str(tmp / "dist")], tmp)
    if built.returncode != 0 and "install build dependencies" in built.stdout + built.stderr:
        pytest.skip(f"pip could not install the build requirements (no package index?): {built.stderr[-300:]}")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    [wheel] = (tmp / "dist").glob("simvq_scale-*.whl")
    target = tmp / "site"
    done = run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def outside(installed: Path, tmp_path: Path) -> dict:
    """An environment that sees the installed folder and not this checkout (run from tmp_path)."""
    env = clean_env()
    env["PYTHONPATH"] = str(installed)
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return env


def checkout_modules() -> set[str]:
    names = set()
    for path in (ROOT / "simvq_scale").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


IMPORT_EVERYTHING = """
import contextlib, importlib, importlib.metadata, io, json, pkgutil, sys
from pathlib import Path
import simvq_scale
from simvq_scale.config import config_file, packaged_config_names

names = ["simvq_scale"] + [m.name for m in pkgutil.walk_packages(simvq_scale.__path__, "simvq_scale.")]
modules = {name: importlib.import_module(name) for name in names}
[dist] = [d for d in importlib.metadata.distributions(path=[sys.argv[1]]) if d.metadata["Name"] == "simvq-scale"]
helps = {}
for entry in dist.entry_points.select(group="console_scripts"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            entry.load()(["--help"])
            code = "returned"
        except SystemExit as e:
            code = e.code
    helps[entry.name] = {"value": entry.value, "exit": code, "out": out.getvalue()}
print(json.dumps({
    "files": {name: module.__file__ for name, module in modules.items()},
    "commands": sorted(n for n in names if n.startswith("simvq_scale.tools.") and hasattr(modules[n], "main")),
    "helps": helps, "configs": packaged_config_names(), "image_demo": str(config_file("image_demo")),
    "sys_path": [str(Path(p).resolve()) for p in sys.path],
}))
"""


@pytest.mark.slow
def test_the_wheel_alone_imports_every_module_and_answers_every_command(installed, tmp_path):
    done = run([sys.executable, "-c", IMPORT_EVERYTHING, str(installed)], tmp_path, outside(installed, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # every module of the checkout is in the wheel, and each was imported from the installed folder
    assert set(found["files"]) == checkout_modules()
    assert all(Path(file).resolve().is_relative_to(installed.resolve()) for file in found["files"].values()), \
        found["files"]
    # the checkout itself is not on the path (a virtual environment kept inside it, as CI's .venv, may be)
    assert str(ROOT.resolve()) not in found["sys_path"], found["sys_path"]
    assert found["configs"] == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert Path(found["image_demo"]).resolve().is_relative_to(installed.resolve())
    # one console script per command module, each answering --help (exit 0, its usage), installed as a script
    helps = found["helps"]
    assert sorted(h["value"] for h in helps.values()) == sorted(f"{m}:main" for m in found["commands"])
    for name, answer in helps.items():
        assert answer["exit"] == 0 and answer["out"].startswith("usage:"), (name, answer)
        assert (installed / "bin" / name).is_file()
    # every checkout script runs one of those commands
    scripts = {p.stem for p in (ROOT / "tools").glob("*.py")} | {"train"}
    assert scripts == {m.rsplit(".", 1)[1] for m in found["commands"]}


@pytest.mark.slow
def test_the_installed_commands_make_the_demo_data_dry_run_the_demo_and_compare_quantizers(installed, tmp_path):
    env = outside(installed, tmp_path)
    made = run([str(installed / "bin" / "simvq-make-demo-data"), "--out", "demo_data"], tmp_path, env)
    assert made.returncode == 0, made.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_data" / "demo.json").read_text())
    assert sorted(tmp_path.glob("demo_data/image-train-*.tar")) and summary["image_train"]
    dry = run([str(installed / "bin" / "simvq-train"), "--config", "image_demo", "--dry-run"], tmp_path, env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    described = json.loads(dry.stdout.strip().splitlines()[-1])
    packaged = yaml.safe_load((ROOT / "configs" / "image_demo.yaml").read_text())
    assert described["codebook_size"] == packaged["quantizer"]["codebook_size"]
    assert described["global_batch"] == packaged["train"]["global_batch"] and described["world_size"] == 1
    # the comparison's children (LC features, training, evaluation) are modules of the installed package
    compared = run([str(installed / "bin" / "simvq-compare-quantizers"), "--config", "image_demo", "--out", "cmp",
                    "--kinds", "simvq,lc", "--codebook-size", "256", "--steps", "2", "--no-plots", "--set",
                    *TINY_COMPARISON, *OFFLINE_EVAL], tmp_path, env)
    assert compared.returncode == 0, compared.stdout[-2000:] + compared.stderr[-2000:]
    with (tmp_path / "cmp" / "table.csv").open() as table:
        assert [(row["run"], row["status"]) for row in csv.DictReader(table)] == [("simvq", "ok"), ("lc", "ok")]
    logs = [tmp_path / "cmp" / "simvq" / "train.log", tmp_path / "cmp" / "simvq" / "eval.log",
            *tmp_path.glob("cmp/lc_features/*.log")]
    assert len(logs) == 3 and all(" -m simvq_scale.tools." in log.read_text() for log in logs)
