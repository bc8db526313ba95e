"""The wheel: it carries templates, static files and migrations, and serves from them alone.

The wheel is built and installed (non-editable, without dependencies) into a folder that is put
first on PYTHONPATH, and `gradwatch serve` is run from a working directory outside the repository,
so every asset must come from inside the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, free_port, wait_healthy


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
