"""The wheel: it carries templates, static files and migrations, and serves from them alone; and
its base install (no `[server]` extra) runs every client command.

For the server, the wheel is installed (non-editable, without dependencies) into a folder that is
put first on PYTHONPATH, and `gradwatch serve` is run from a working directory outside the
repository, so every asset must come from inside the installed package.

For the client, the wheel goes into a fresh virtual environment WITHOUT system site-packages, so
that none of the server's packages can be imported (a real ModuleNotFoundError, as on a user's
machine: no import hook to trust). torch comes from the dev environment through a `.pth` file that
names a folder of links to torch and to the distributions torch itself requires, and nothing else:
no network, and no fastapi/pydantic/sqlalchemy/uvicorn reachable.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, ServerProcess, free_port, wait_healthy

SERVER_ONLY = ("fastapi", "pydantic", "pydantic_settings", "sqlalchemy", "uvicorn", "alembic")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO_ROOT)],
        check=True,
    )  # fmt: skip
    (path,) = out.glob("gradwatch-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
    )  # fmt: skip
    return target


def test_wheel_ships_templates_static_and_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for asset in ("templates/run.html", "static/css/app.css", "migrations/env.py"):
        assert f"server/_assets/{asset}" in names
    assert any(n.startswith("server/_assets/migrations/versions/") for n in names)
    assert "client_hook/monitor.py" in names


def test_wheel_declares_torch_for_the_client_and_fastapi_only_as_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any("torch>=2.1" in r and "extra" not in r for r in requires)
    assert all("extra ==" in r for r in requires if "fastapi" in r)


@pytest.fixture
def installed_server(installed: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(installed),
        "GRADWATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'wheel.db'}",
    }
    code = "import sys; from server.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_installed_package_is_imported_from_the_install_folder(installed: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import server, client_hook; print(server.__file__)"],
        env={**os.environ, "PYTHONPATH": str(installed)}, cwd=installed.parent,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip().startswith(str(installed))


def test_installed_server_renders_pages_from_packaged_assets(installed_server: str) -> None:
    with urllib.request.urlopen(installed_server + "/", timeout=10) as page:
        html = page.read().decode()
    assert "gradwatch" in html and "<table" in html
    with urllib.request.urlopen(installed_server + "/static/css/app.css", timeout=10) as css:
        assert css.status == 200 and css.read()


# ---------------------------------------------------------------- the client-only install


def _requirement_closure(name: str) -> list[importlib.metadata.Distribution]:
    """`name`'s distribution and those it requires (no extras), recursively."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not have
        seen[key] = dist
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0])
    return list(seen.values())


def _link_torch_only(folder: Path) -> None:
    """Links, in `folder`, to the top-level files of torch and its requirements (and numpy,
    which torch warns without), with their metadata: importable, and nothing else."""
    folder.mkdir()
    for dist in _requirement_closure("torch") + _requirement_closure("numpy"):
        for file in dist.files or []:
            top = file.parts[0]
            source = Path(str(dist.locate_file(top)))
            if top == ".." or not source.exists() or (folder / top).exists():
                continue
            (folder / top).symlink_to(source)


@pytest.fixture(scope="module")
def client_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel's base install; returns its bin folder."""
    root = tmp_path_factory.mktemp("client-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    _link_torch_only(root / "torch-only")
    (Path(site) / "torch_only.pth").write_text(str(root / "torch-only") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
         "--no-deps", str(wheel)],
        check=True,
    )  # fmt: skip
    return venv / "bin"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH_", "PYTHON"))}
    return {**env, **extra}


def gradwatch(bin_dir: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "gradwatch"), *args], cwd=cwd, env=_clean_env(**env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_client_venv_has_torch_and_none_of_the_server_packages(client_venv: Path, tmp_path):
    code = (
        "import importlib.util, torch, client_hook.monitor; "
        f"print([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)])"
    )
    done = subprocess.run(
        [str(client_venv / "python"), "-c", code], cwd=tmp_path, env=_clean_env(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [[], ["import"], ["sync"], ["train"]])
def test_client_install_shows_help(client_venv: Path, tmp_path: Path, command: list[str]):
    done = gradwatch(client_venv, *command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: gradwatch {' '.join(command)}".rstrip())
    assert "Traceback" not in done.stderr


def test_client_install_tells_its_version(client_venv: Path, tmp_path: Path):
    done = gradwatch(client_venv, "--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"gradwatch {importlib.metadata.version('gradwatch')}"


@pytest.mark.parametrize("args", [["serve"], ["serve", "--help"], ["serve", "--port", "1"]])
def test_client_install_serve_names_the_install_it_needs(client_venv, tmp_path, args):
    done = gradwatch(client_venv, *args, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stdout == "" and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("gradwatch serve: needs the server install: ")
    assert "pip install 'gradwatch[server]'" in line


def test_help_works_beside_a_package_named_server(client_venv: Path, tmp_path: Path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("raise SystemExit('the wrong server')\n")
    python = str(client_venv / "python")
    for command in ([str(client_venv / "gradwatch")], [python, "-m", "client_hook.cli"]):
        for env in ({}, {"PYTHONPATH": str(tmp_path)}):
            done = subprocess.run(
                [*command, "--help"], cwd=tmp_path, env=_clean_env(**env),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0 and "usage: gradwatch" in done.stdout, (command, env)


TRAIN = """
import sys, torch
from client_hook import GradMonitor
torch.manual_seed(0)
shared = torch.nn.Linear(4, 8)
heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(2)])
monitor = GradMonitor(shared, ["a", "b"], run_name="client-only", sample_every=1, **KWARGS)
for epoch in range(3):
    for step in range(2):
        x = torch.randn(16, 4)
        h = torch.relu(shared(x))
        losses = {t: head(h).pow(2).mean() for t, head in zip(["a", "b"], heads)}
        monitor.observe(losses)
        sum(losses.values()).backward()
    monitor.end_epoch()
monitor.close(timeout=3)
print(monitor.run_id)
"""


def _train(client_venv: Path, cwd: Path, kwargs: str) -> str:
    done = subprocess.run(
        [str(client_venv / "python"), "-c", TRAIN.replace("**KWARGS", kwargs)],
        cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _run_on(server: ServerProcess, run_id: str) -> dict:
    with urllib.request.urlopen(f"{server.url}/api/runs/{run_id}", timeout=10) as r:
        return dict(json.loads(r.read()))


def test_client_install_imports_a_run_file_into_a_real_server(client_venv: Path, tmp_path: Path):
    path = tmp_path / "run.jsonl"
    run_id = _train(client_venv, tmp_path, f"local_path={str(path)!r}")
    with ServerProcess(f"sqlite:///{tmp_path / 'import.db'}") as server:
        done = gradwatch(client_venv, "import", str(path), "--server", server.url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "3 epoch(s) stored, 0 already there" in done.stdout
        run = _run_on(server, run_id)
    assert run["epoch_count"] == 3 and run["status"] == "finished"


def test_client_install_syncs_a_spool_into_a_real_server(client_venv: Path, tmp_path: Path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'sync.db'}")  # not started: all spooled
    spool = tmp_path / "spool"
    run_id = _train(client_venv, tmp_path, f"server_url={server.url!r}, spool_dir={str(spool)!r}")
    with server:
        done = gradwatch(client_venv, "sync", "--spool-dir", str(spool), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"synced run {run_id}: 3 epoch(s) stored, 0 already there" in done.stdout
        run = _run_on(server, run_id)
    assert run["epoch_count"] == 3 and run["status"] == "finished"
    assert not (spool / run_id).exists()
