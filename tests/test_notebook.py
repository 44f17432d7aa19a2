"""inference.ipynb: executed headless with nbclient, and driven in JupyterLab by a real browser."""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "inference.ipynb"
SAMPLES = sorted(path for path in (REPO / "samples").iterdir() if path.suffix in {".jpg", ".png"})
LINE = re.compile(
    r"(\S+): predicted (\S+)  \(confidence ([01]\.\d{3}) = length of the winning capsule\)"
)
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; `playwright install` is not used
SETTINGS = {  # JupyterLab settings for the browser test, by plugin
    # Render every cell: with JupyterLab's default windowing, cells out of view may be hidden.
    "notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # No news or update pop-ups: they would reach the internet and cover the page.
    "apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
]


def execute_notebook(checkpoint: Path, monkeypatch) -> list[str]:
    """Run every cell in the repository root as "Run All" does; return the printed lines."""
    monkeypatch.setenv(
        "CAPSNET_CHECKPOINT", str(checkpoint)
    )  # the kernel inherits this environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()
    streams = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output["output_type"] == "stream"
    ]
    assert all(output["name"] == "stdout" for output in streams), "the notebook wrote to stderr"
    return "".join(output["text"] for output in streams).splitlines()


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    assert not any("class CapsNet" in cell.source for cell in code)  # it imports the model


def test_notebook_runs_headless(tiny_checkpoint, monkeypatch):
    lines = execute_notebook(tiny_checkpoint, monkeypatch)
    assert lines[0].startswith(f"checkpoint {tiny_checkpoint}")
    assert [LINE.fullmatch(line)[1] for line in lines[1 : 1 + len(SAMPLES)]] == [
        path.name for path in SAMPLES
    ]
    assert lines[-1].startswith(f"perturbing the capsule of {SAMPLES[0].name}")


def test_notebook_predicts_the_samples(trained_checkpoint, monkeypatch):
    lines = execute_notebook(trained_checkpoint, monkeypatch)
    predictions = {match[1]: match[2] for match in map(LINE.fullmatch, lines) if match}
    assert predictions == {
        path.name: path.name[0] for path in SAMPLES
    }  # names start with the digit


# The browser test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "JupyterLab exited at start"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer {url} within {timeout} s")


@pytest.fixture
def playwright_api():
    """Playwright's sync API, or skip: it drives Debian's chromium, never a downloaded browser."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    return pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed: pip install playwright"
    )


def jupyter_env(tmp_path: Path, checkpoint: Path) -> dict:
    """Environment for a JupyterLab whose config, runtime, settings, workspaces are in tmp_path."""
    settings = tmp_path / "jupyterlab_settings_dir" / "@jupyterlab"
    for plugin, values in SETTINGS.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).write_text(json.dumps(values))
    folders = (
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
        "IPYTHONDIR",
    )
    return {
        **os.environ,
        **{name: str(tmp_path / name.lower()) for name in folders},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CAPSNET_CHECKPOINT": str(checkpoint),
    }


@pytest.fixture
def jupyterlab(playwright_api, tmp_path, tiny_checkpoint, request):
    """JupyterLab on 127.0.0.1 serving a copy of the notebook, so nothing is saved into the
    repository. Yields the notebook's URL and the checkpoint the notebook loads."""
    checkpoint = trained_or(tiny_checkpoint, request)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    (work / "samples").symlink_to(REPO / "samples")
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with open(tmp_path / "jupyterlab.log", "w") as log:
        server = subprocess.Popen(
            command, env=jupyter_env(tmp_path, checkpoint), stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server)
            yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}", checkpoint
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def trained_or(fallback: Path, request) -> Path:
    """The trained checkpoint when there is one (then predictions are checked), else `fallback`."""
    try:
        return request.getfixturevalue("trained_checkpoint")
    except pytest.skip.Exception:
        return fallback


# Share of dark pixels in each figure of the upload's Output widget: a blank figure has ~0.
FIGURE_INK = """() => Array.from(document.querySelectorAll('.widget-output img')).map(img => {
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let dark = 0;
    for (let i = 0; i < pixels.length; i += 4) dark += pixels[i + 3] > 0 && pixels[i] < 128;
    return dark / (canvas.width * canvas.height);
})"""


def run_all_and_upload(page, url: str, uploads: list[Path]) -> tuple[list[str], list[float]]:
    """Open the notebook, Run All, upload images with the FileUpload button; return the lines
    the upload printed and the share of dark pixels in each figure it drew."""
    page.goto(url)
    # The toolbar's indicator says idle before the kernel is up; the status bar waits for it.
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.get_by_text(f"perturbing the capsule of {SAMPLES[0].name}").wait_for()  # the last cell ran
    # ipywidgets 8 keeps its <input type=file> off the page: catch the chooser its click opens.
    with page.expect_file_chooser() as chooser:
        page.locator("button.widget-upload").click()
    chooser.value.set_files([str(path) for path in uploads])
    lines = [
        page.get_by_text(re.compile(rf"{re.escape(path.name)}: predicted")).first
        for path in uploads
    ]
    for line in lines:
        line.wait_for()
    page.locator(".widget-output img").nth(len(uploads) - 1).wait_for()
    return [LINE.search(line.inner_text())[0] for line in lines], page.evaluate(FIGURE_INK)


@pytest.mark.slow
@pytest.mark.browser
def test_notebook_in_jupyterlab_with_upload(playwright_api, jupyterlab, tiny_checkpoint, tmp_path):
    url, checkpoint = jupyterlab
    uploads = [
        tmp_path / "upload_test_7.jpg",
        tmp_path / "upload_test_2.png",
    ]  # names no sample has
    shutil.copy(REPO / "samples" / "7_blue_ballpoint.jpg", uploads[0])
    shutil.copy(REPO / "samples" / "2_scan_16bit.png", uploads[1])
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        try:
            lines, figure_ink = run_all_and_upload(page, url, uploads)
        except playwright_api.Error:
            page.screenshot(path=tmp_path / "failure.png")
            raise
        finally:
            browser.close()
    assert len(figure_ink) == len(uploads) and min(figure_ink) > 0.05, figure_ink
    if checkpoint != tiny_checkpoint:
        assert [LINE.fullmatch(line)[2] for line in lines] == ["7", "2"], lines
