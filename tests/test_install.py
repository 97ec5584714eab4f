"""An installed wheel (not the editable checkout) runs the README's main command from any directory (issue 14).

The gin files live in the repository's configs/; the wheel carries them as `rest_jax/configs`. Before, a
`pip install .` gave a `rest_jax` command that could not find `experiments/demo.gin`.
"""

import os
import pathlib
import shlex
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_main_command() -> list[str]:
    """The `python -m rest_jax.main rest ...` part of the README's first command, as typed."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        for line in f:
            if "pip install -e ." in line and "rest_jax.main rest" in line:
                return shlex.split(line.split("&&")[-1].strip())
    raise AssertionError("README's first command (install + rest on the demo) not found")


def test_wheel_carries_every_config_and_runs_the_main_command_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), REPO], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("rest_jax-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".gin")}
    in_repo = {"rest_jax/configs/" + os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs"))
               for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files if f.endswith(".gin")}
    assert shipped == in_repo
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    argv = _readme_main_command()
    assert argv[:4] == ["python", "-m", "rest_jax.main", "rest"], argv
    env = dict(os.environ, PYTHONPATH=str(site))  # the wheel's copy, not the checkout's
    proc = subprocess.run([sys.executable, *argv[1:], "--dry_run"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "T5Config.emb_dim = 64" in proc.stdout  # models/tiny.gin, included by experiments/demo.gin
    where = subprocess.run([sys.executable, "-c", "import rest_jax; print(rest_jax.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(site)), where.stdout


def test_every_module_level_import_is_a_declared_requirement():
    # A package imported at module level but installed only as another package's dependency (or by the test
    # extra) breaks `pip install -e .` on a fresh machine; lazy imports inside functions are optional extras.
    import ast  # pylint: disable=import-outside-toplevel
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    import re  # pylint: disable=import-outside-toplevel

    repo = pathlib.Path(REPO)
    setup = (repo / "setup.py").read_text()
    runtime = setup.split("TEST_REQUIRES")[0]
    declared = {re.split(r"[=<>\[ ]", r)[0].lower().replace("_", "-")
                for r in re.findall(r'^\s*"([A-Za-z0-9_.\-]+)[^"]*",', runtime, flags=re.M)}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((repo / "rest_jax").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("rest_jax", "__future__"):
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(repo)}: import {name} ({sorted(dists)})")
    assert declared and not missing, missing
