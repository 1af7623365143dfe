"""The built wheel installs into a fresh virtual environment and runs the README's quickstart.

The wheel is built from this checkout with ``python -m build --wheel --no-isolation`` (the
build backend comes from the ``test`` extras, so nothing is downloaded). The environment
is a new ``venv`` without pip; its site-packages gets the wheel, installed with
``--no-deps``, and a ``.pth`` file that appends this interpreter's site-packages for the
dependencies (jax, optax, flax, ...). Directories named in a ``.pth`` file are put on
``sys.path`` without processing the ``.pth`` files inside them, so the editable install of
this checkout stays invisible, and the wheel's copy comes first anyway. The quickstart runs
from a directory outside the repository, and the test checks which ``mlbfgs_optax`` it
imported.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_quickstart() -> list[str]:
    """The Python blocks of the README's Quickstart section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_wheel_installs_and_runs_the_readme_quickstart(tmp_path):
    blocks = readme_quickstart()
    assert len(blocks) >= 2, "the README's Quickstart should show optax and Flax"

    # 1. Build the wheel.
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
         str(ROOT)], timeout=300)
    (wheel,) = dist.glob("mlbfgs_optax-*-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mlbfgs_optax/__init__.py", "mlbfgs_optax/py.typed"} <= names
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)

    # 2. A fresh environment that sees this interpreter's dependencies but not this checkout.
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    bindir = "Scripts" if os.name == "nt" else "bin"
    python = env_dir / bindir / ("python.exe" if os.name == "nt" else "python")
    env_site = Path(run([str(python), "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        timeout=60).stdout.strip())
    ours = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
            *site.getsitepackages()]
    deps = [p for p in dict.fromkeys(ours) if Path(p).is_dir() and Path(p) != env_site]
    (env_site / "_dependencies_of_the_test_environment.pth").write_text("\n".join(deps) + "\n")

    # 3. Install the wheel there, nothing else.
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "-q", str(wheel)], timeout=300)

    # 4. The README's quickstart, from a directory outside the repository.
    workdir = tmp_path / "outside"
    workdir.mkdir()
    script = workdir / "quickstart.py"
    script.write_text("\n\n".join(blocks) + "\n\n" + (
        "import pathlib, mlbfgs_optax\n"
        "print('MODULE', pathlib.Path(mlbfgs_optax.__file__).resolve())\n"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    out = run([str(python), "-I", str(script)], cwd=workdir, env=env, timeout=600).stdout

    module = Path(re.search(r"^MODULE (.*)$", out, re.M).group(1))
    assert module.is_relative_to(env_site.resolve()), module
    assert not module.is_relative_to(ROOT), module
    assert (module.parent / "py.typed").is_file()
    losses = [float(v) for v in re.findall(r"^loss (\S+)$", out, re.M)]
    assert len(losses) == len(blocks) and all(v < 1e-3 for v in losses), out
