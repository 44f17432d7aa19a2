"""inference.ipynb: executed headless with nbclient, and driven in JupyterLab by a real browser;
the functions its widgets use (inference.py), and the torch.hub entry point (hubconf.py).
notebook.py's figures and widgets are tested in test_notebook_helpers.py.

The browser test can save a picture of the notebook in use for the README:
CAPSNET_NOTEBOOK_SCREENSHOT=results/notebook.png pytest tests/test_notebook.py -k jupyterlab"""

import base64
import io
import json
import math
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

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_notebook_helpers import save_tiny_pair_checkpoint

from capslab.canvas import DrawingCanvas
from capslab.checkpoint import SHIPPED_CHECKPOINT, load_capsnet, load_checkpoint, save_checkpoint
from capslab.inference import (
    PERTURBATIONS,
    classify,
    decode_capsule,
    dimension_effects,
    evidence_map,
    grid_extent,
    perturbed_reconstructions,
    receptive_field,
    routing_maps,
    spread_across_inputs,
    to_png,
)
from capslab.notebook_multimnist import NOT_THERE_YET, gray_png, pair_image
from capslab.preprocess import preprocess
from capslab.settings import settings_to_dict
from CapsNet import CapsNet, CapsNetConfig

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "inference.ipynb"
SAMPLES = sorted(path for path in (REPO / "samples").iterdir() if path.suffix in {".jpg", ".png"})
LINE = re.compile(
    r"(\S+): predicted (\S+)  \(confidence ([01]\.\d{3}) = length of the winning capsule\)"
)
EVIDENCE = re.compile(
    r"evidence maps of (\d+) samples: c_ij varies (\d+\.\d)% from input to input, "
    r"the agreement (\d+\.\d)% \(each cell's standard deviation over the inputs, over the map's "
    r"mean size\)"
)
STRONGEST = re.compile(r"(\S+), capsule (\S+): dimension (\d+) changes the reconstruction most")
PAIRED = re.compile(r"(\S+) \+ (\S+) moved ([+-]\d) px right, ([+-]\d) px down: the two longest")
SECOND_DIGIT = "7_blue_ballpoint.jpg"  # the sample the notebook pairs with the latest digit
# Where no MultiMNIST model is: a path under /dev/null, which is no folder.
NO_MULTIMNIST = Path(os.devnull) / "capsnet_multimnist.pt"
STRIPPED_METADATA = "metadata.language_info"  # Python's version, written by each run
SAMPLES_SHOWN = 4  # the notebook's first screen: these samples, then drawing and upload
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


def execute_notebook(
    checkpoint: Path,
    monkeypatch,
    flags: dict | None = None,
    multimnist: Path = NO_MULTIMNIST,
    sections: tuple[str, ...] | None = None,
):
    """Run every cell in the repository root as "Run All" does, after replacing each line
    `flags` names (a flag as it is committed) with its value there; return the printed lines,
    the widgets the notebook left, by model name (each a list of states), and the notebook.
    `multimnist` is the MultiMNIST checkpoint ("Two digits at once"); `sections`, headings of
    the sections to run (with the cells above the first section), else all of them."""
    import nbformat  # here: nbformat and nbclient take ~2 s to import, and only slow tests
    from nbclient import NotebookClient  # run a kernel

    # The kernel inherits this environment.
    monkeypatch.setenv("CAPSNET_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("CAPSNET_MULTIMNIST_CHECKPOINT", str(multimnist))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if sections is not None:
        notebook.cells = only_sections(notebook.cells, sections)
    for committed, value in (flags or {}).items():
        (cell,) = [cell for cell in notebook.cells if committed in cell.source]
        cell.source = cell.source.replace(committed, value)
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
    lines = "".join(output["text"] for output in streams).splitlines()
    return lines, widgets_by_model(notebook), notebook


def only_sections(cells: list, headings: tuple[str, ...]) -> list:
    """The cells above the first "## " heading, and those of the sections headed `headings`."""
    kept, keep = [], True
    for cell in cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            keep = cell.source.splitlines()[0][3:] in headings
        if keep:
            kept.append(cell)
    return kept


def widgets_by_model(notebook) -> dict:
    """The widget state nbclient saved: model name -> states, binary values decoded to bytes."""
    if "widgets" not in notebook.metadata:  # the cells run made none
        return {}
    saved = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    widgets = {}
    for model in saved.values():
        state = dict(model["state"])
        for buffer in model.get("buffers", []):
            state[buffer["path"][0]] = base64.b64decode(buffer["data"])
        widgets.setdefault(model["model_name"], []).append(state)
    return widgets


def test_notebook_is_committed_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code)
    assert not any("class CapsNet" in "".join(cell["source"]) for cell in code)  # it imports it
    assert "widgets" not in notebook["metadata"]  # no saved widget state either


def strip_outputs(notebook: Path) -> str:
    """The notebook as the git filter that .gitattributes names, set up as the README says,
    hands it to git."""
    command = ["nbstripout", "--textconv", "--extra-keys", STRIPPED_METADATA, str(notebook)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_notebook_is_committed_as_the_git_filter_strips_it():
    attributes = (REPO / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attributes
    assert f"git config filter.nbstripout.extrakeys {STRIPPED_METADATA}" in attributes
    if not shutil.which("nbstripout"):
        pytest.skip("nbstripout is not installed: pip install nbstripout")
    assert strip_outputs(NOTEBOOK) == NOTEBOOK.read_text()


@pytest.fixture(scope="module")
def tiny_pair_checkpoint(tmp_path_factory) -> Path:
    """A tiny 36x36 CapsNet for "Two digits at once", its two drawings in distinct colours."""
    return save_tiny_pair_checkpoint(tmp_path_factory.mktemp("tiny_pair") / "tiny_pair.pt")


@pytest.mark.slow
def test_notebook_runs_headless(tiny_checkpoint, tiny_pair_checkpoint, monkeypatch, tmp_path):
    lines, widgets, executed = execute_notebook(
        tiny_checkpoint, monkeypatch, multimnist=tiny_pair_checkpoint
    )
    assert lines[0].startswith(f"checkpoint {tiny_checkpoint}")
    shown = SAMPLES[:SAMPLES_SHOWN]  # the rest one click away
    assert [LINE.fullmatch(line)[1] for line in lines[1 : 1 + len(shown)]] == [
        path.name for path in shown
    ]
    (more,) = (state for state in widgets["ButtonModel"] if state["description"] != "Reset")
    assert more["description"] == f"Show the other {len(SAMPLES) - len(shown)} samples"
    assert EVIDENCE.fullmatch(lines[-2])[1] == str(len(SAMPLES))  # measured over them all
    assert lines[-1] == f"MultiMNIST checkpoint {tiny_pair_checkpoint}"
    # The canvas, waiting for a stroke.
    (canvas,) = widgets["AnyModel"]
    assert (canvas["size"], canvas["pen_width"], canvas["png"]) == (280, 18, b"")
    assert "pointerup" in canvas["_esm"]
    # 16 sliders at the first sample's winning capsule, offsets 0; the digit and its
    # reconstruction beside them.
    image28 = preprocess(SAMPLES[0])
    expected = classify(load_capsnet(tiny_checkpoint, "cpu")[0], image28)
    sliders = sorted(widgets["FloatSliderModel"], key=lambda state: int(state["description"][4:]))
    assert [state["description"] for state in sliders] == [f"dim {d}" for d in range(16)]
    assert [state["value"] for state in sliders] == [0.0] * 16
    assert {(state["min"], state["max"]) for state in sliders} == {(-0.5, 0.5)}
    images = {state["_dom_classes"][0]: state["value"] for state in widgets["ImageModel"]}
    assert images.keys() == {
        "capsule-digit",
        "capsule-reconstruction",
        "figure-4",
        "pair-input",
        "pair-reconstruction",
    }
    for name, image in (
        ("capsule-digit", image28),
        ("capsule-reconstruction", expected["reconstruction"]),
    ):
        assert (png_pixels(images[name]) - png_pixels(to_png(image))).abs().max() <= 1, name
    captions = {state["_dom_classes"][0]: state["value"] for state in widgets["HTMLModel"]}
    assert captions.keys() == {"capsule-caption", "pair-caption"}
    assert STRONGEST.match(captions["capsule-caption"]).group(1, 2) == (
        SAMPLES[0].name,
        expected["label"],
    )
    # Two digits at once: the first sample and the second digit, centred, on the 36x36 canvas.
    assert PAIRED.match(captions["pair-caption"]).groups() == (
        SAMPLES[0].name,
        SECOND_DIGIT,
        "+0",
        "+0",
    )
    (second,) = widgets["DropdownModel"]
    assert second["_options_labels"] == [path.name for path in SAMPLES]
    offsets = widgets["IntSliderModel"]
    assert [(state["min"], state["max"], state["value"]) for state in offsets] == [(-4, 4, 0)] * 2
    pair = pair_image(image28, preprocess(REPO / "samples" / SECOND_DIGIT), 0, 0)
    assert images["pair-input"] == gray_png(pair)
    # What the git filter of .gitattributes commits of the notebook once run: itself.
    if shutil.which("nbstripout"):
        import nbformat

        nbformat.write(executed, tmp_path / NOTEBOOK.name)
        assert strip_outputs(tmp_path / NOTEBOOK.name) == NOTEBOOK.read_text()


@pytest.mark.slow
def test_notebook_refuses_a_model_without_a_trained_decoder(tiny_checkpoint, tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    checkpoint = load_checkpoint(tiny_checkpoint)
    checkpoint["train_config"] = {"reconstruction_weight": 0.0}
    save_checkpoint(checkpoint, tmp_path / "norecon.pt")
    with pytest.raises(CellExecutionError, match="trained without the reconstruction loss"):
        execute_notebook(tmp_path / "norecon.pt", monkeypatch)


@pytest.mark.slow
def test_notebook_predicts_the_samples_and_says_how_to_train_a_multimnist_model(
    trained_checkpoint, monkeypatch
):
    flags = {"SHOW_ALL_SAMPLES = False": "SHOW_ALL_SAMPLES = True"}
    lines, widgets, _ = execute_notebook(trained_checkpoint, monkeypatch, flags)
    # Without a MultiMNIST model, "Two digits at once" (the last section) says how to train one
    # and shows nothing more.
    assert lines[-1] == NOT_THERE_YET.format(path=NO_MULTIMNIST)
    assert "python train.py --dataset multimnist" in lines[-1]
    shown = {state["_dom_classes"][0] for state in widgets["ImageModel"]}
    assert shown == {"capsule-digit", "capsule-reconstruction", "figure-4"}
    predictions = {match[1]: match[2] for match in map(LINE.fullmatch, lines) if match}
    assert predictions == {
        path.name: path.name[0] for path in SAMPLES
    }  # names start with the digit
    # What the notebook says: the coupling coefficients barely vary, the agreement does.
    (measured,) = filter(None, map(EVIDENCE.fullmatch, lines))
    coupling, agreement = float(measured[2]), float(measured[3])
    assert coupling < 10 and agreement > 10 * coupling, measured[0]


# What the widgets use


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint) -> CapsNet:
    return load_capsnet(tiny_checkpoint, torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def trained_model(trained_checkpoint) -> CapsNet:
    return load_capsnet(trained_checkpoint, torch.device("cpu"))[0]


def test_decode_capsule_is_the_reconstruction_and_follows_the_sliders(tiny_model):
    result = classify(tiny_model, preprocess(SAMPLES[0]))
    capsule, winner = result["capsule"], result["class_index"]
    image = decode_capsule(tiny_model, capsule, winner)  # (28, 28)
    torch.testing.assert_close(image, result["reconstruction"])
    moved = capsule + 0.25 * torch.eye(16)[3]  # dimension 3 dragged by +0.25
    grid = perturbed_reconstructions(tiny_model, capsule, winner)  # (16, D, 28, 28)
    torch.testing.assert_close(decode_capsule(tiny_model, moved, winner), grid[3, -1])


def test_dimension_effects_are_figure_4s_largest_changes(tiny_model):
    result = classify(tiny_model, preprocess(SAMPLES[1]))
    effects = dimension_effects(tiny_model, result["capsule"], result["class_index"])  # (16,)
    grid = perturbed_reconstructions(tiny_model, result["capsule"], result["class_index"])
    middle = PERTURBATIONS.index(0.0)
    for dim in range(16):
        changes = [float((grid[dim, end] - grid[dim, middle]).norm()) for end in (0, -1)]
        assert float(effects[dim]) == pytest.approx(max(changes), rel=1e-5)


def test_routing_maps_sum_each_grid_position_over_the_capsule_types(tiny_model):
    image28 = preprocess(SAMPLES[2])
    maps = routing_maps(tiny_model, image28)
    config = tiny_model.config
    grid = config.primary_grid
    # The same quantities for all 1,152 (here 72) capsules, from the model's own forward pass.
    x = image28[None, None]  # (1, 1, 28, 28)
    u = tiny_model.primary_caps(tiny_model.conv1(x))  # (1, I, 8)
    lengths, _, v = tiny_model(x)  # (1, J), _, (1, J, 16)
    winner = int(lengths.argmax())
    agreement = tiny_model.digit_caps.votes(u)[0, winner] @ v[0, winner]  # (I,)
    coupling = tiny_model.digit_caps(u)[1][0, winner]  # (I,)
    position = torch.arange(config.num_primary_caps) % grid**2  # i = (type, row, col)
    for name, per_capsule in (("agreement", agreement), ("coupling", coupling)):
        expected = torch.zeros(grid**2).index_add_(0, position, per_capsule.detach())
        torch.testing.assert_close(maps[name], expected.view(grid, grid))
    assert maps["class_index"] == winner == classify(tiny_model, image28)["class_index"]
    torch.testing.assert_close(evidence_map(tiny_model, image28), maps["agreement"])


def test_receptive_fields_are_where_the_input_reaches_each_grid_cell(small_model):
    x = torch.rand(1, 1, 28, 28, requires_grad=True)
    u = small_model.primary_caps(small_model.conv1(x))  # (1, I, 8)
    grid = small_model.config.primary_grid
    for row, col in [(0, 0), (2, 5), (5, 3)]:
        (reach,) = torch.autograd.grad(u[0, row * grid + col].sum(), x, retain_graph=True)
        rows = reach[0, 0].abs().sum(dim=1).nonzero().flatten().tolist()  # input rows reached
        cols = reach[0, 0].abs().sum(dim=0).nonzero().flatten().tolist()
        top, left, side = receptive_field(small_model.config, row, col)
        assert (rows[0], rows[-1], cols[0], cols[-1]) == (
            top,
            top + side - 1,
            left,
            left + side - 1,
        )
    assert grid_extent(CapsNetConfig()) == (7.0, 19.0)  # cell centres 8, 10, ..., 18


def test_spread_across_inputs():
    same = torch.rand(6, 6).expand(5, 6, 6)  # (N, 6, 6), one map for every input
    assert spread_across_inputs(same) == pytest.approx(0, abs=1e-6)
    two = torch.stack([torch.ones(6, 6), 3 * torch.ones(6, 6)])  # std sqrt(2), mean 2
    assert spread_across_inputs(two) == pytest.approx(math.sqrt(2) / 2)


def png_pixels(png: bytes) -> torch.Tensor:
    """PNG bytes -> (H, W) grey levels 0..255 as floats."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32))


def drawing(stroke: list[tuple[float, float]]) -> bytes:
    """What the canvas sends: a 280x280 PNG, black ink of its pen width on white."""
    page = Image.new("RGB", (280, 280), "white")
    points = [(280 * x, 280 * y) for x, y in stroke]
    ImageDraw.Draw(page).line(points, fill="black", width=18, joint="curve")
    out = io.BytesIO()
    page.save(out, "PNG")
    return out.getvalue()


ONE = [(0.5, 0.15), (0.5, 0.85)]  # strokes in fractions of the canvas's side
ZERO = [
    (0.5 + 0.22 * math.sin(2 * math.pi * k / 40), 0.5 - 0.33 * math.cos(2 * math.pi * k / 40))
    for k in range(41)
]


def test_canvas_strokes_go_through_preprocess(trained_model):
    canvas = DrawingCanvas()
    strokes = []
    canvas.observe(lambda change: strokes.append(change["new"]), names="png")
    labels = []
    for stroke in (ONE, ZERO):
        canvas.set_state({"png": memoryview(drawing(stroke))})  # as the browser sends it
        assert isinstance(canvas.png, bytes)
        labels.append(classify(trained_model, preprocess(canvas.png))["label"])
    canvas.set_state({"png": memoryview(b"")})  # Clear
    assert labels == ["1", "0"] and len(strokes) == 3 and strokes[-1] == b""


# torch.hub


def test_torch_hub_loads_the_shipped_model():
    if not SHIPPED_CHECKPOINT.is_file():
        pytest.skip(f"{SHIPPED_CHECKPOINT} is not shipped")
    model = torch.hub.load(str(REPO), "capsnet", source="local", pretrained=True)
    assert isinstance(model, CapsNet) and not model.training
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}
    shipped = load_checkpoint(SHIPPED_CHECKPOINT)
    assert settings_to_dict(model.config) == shipped["config"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, shipped["model"][name]), name


def test_torch_hub_builds_an_untrained_paper_model():
    model = torch.hub.load(str(REPO), "capsnet", source="local", pretrained=False)
    assert isinstance(model, CapsNet) and not model.training
    assert model.config == CapsNetConfig()
    lengths, reconstructions, v = model(torch.rand(2, 1, 28, 28))
    assert (lengths.shape, reconstructions.shape, v.shape) == ((2, 10), (2, 1, 28, 28), (2, 10, 16))


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


def jupyter_env(tmp_path: Path, checkpoint: Path, multimnist: Path) -> dict:
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
        "CAPSNET_MULTIMNIST_CHECKPOINT": str(multimnist),
    }


@pytest.fixture
def jupyterlab(playwright_api, tmp_path, tiny_checkpoint, tiny_pair_checkpoint, request):
    """JupyterLab on 127.0.0.1 serving a copy of the notebook, so nothing is saved into the
    repository. Yields the notebook's URL and the checkpoint the notebook loads; "Two digits at
    once" loads the tiny MultiMNIST one."""
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
            command,
            env=jupyter_env(tmp_path, checkpoint, tiny_pair_checkpoint),
            stdout=subprocess.DEVNULL,
            stderr=log,
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


def run_all(page, url: str) -> None:
    """Open the notebook and Run All; return once the last of its cells tested here has run."""
    page.goto(url)
    # The toolbar's indicator says idle before the kernel is up; the status bar waits for it.
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.get_by_text(re.compile(r"evidence maps of \d+ samples")).wait_for()
    page.locator(".pair-caption").get_by_text(PAIRED).first.wait_for()  # Two digits at once


def upload(page, files: list[Path]) -> list[str]:
    """Upload images with the FileUpload button; return the lines printed for them."""
    # ipywidgets 8 keeps its <input type=file> off the page: catch the chooser its click opens.
    with page.expect_file_chooser() as chooser:
        page.locator("button.widget-upload").click()
    chooser.value.set_files([str(path) for path in files])
    lines = [
        page.get_by_text(re.compile(rf"{re.escape(path.name)}: predicted")).first for path in files
    ]
    for line in lines:
        line.wait_for()
    page.locator(".widget-output img").nth(len(files) - 1).wait_for()
    return [LINE.search(line.inner_text())[0] for line in lines]


def wait_for_caption(page, name: str) -> None:
    """Wait until the sliders hold the capsule of the image called `name`."""
    page.get_by_text(re.compile(rf"{re.escape(name)}, capsule \S+: dimension")).wait_for()


# Where the canvas starts, in screens of the notebook's scrolling panel from its top.
CANVAS_DEPTH = """() => {
    const canvas = document.querySelector('canvas.capsnet-canvas');
    const panel = canvas.closest('.jp-WindowedPanel-outer');
    const top = canvas.getBoundingClientRect().top - panel.getBoundingClientRect().top;
    return (top + panel.scrollTop) / panel.clientHeight;
}"""

# Each image widget's shape on the page against its own: 1 where the aspect ratio is kept.
IMAGE_STRETCH = """() => {
    const images = Array.from(document.querySelectorAll('img.widget-image'));
    if (images.some(img => !img.complete || !img.naturalWidth)) return null;  // one is loading
    return Object.fromEntries(images.map(img => {
        const box = img.getBoundingClientRect();
        const drawn = box.width / box.height, own = img.naturalWidth / img.naturalHeight;
        const name = ['capsule-digit', 'capsule-reconstruction', 'figure-4', 'pair-input',
                      'pair-reconstruction']
            .find(name => img.classList.contains(name));
        return [name, [drawn / own, box.width, box.height]];
    }));
}"""


def digest(selector: str) -> str:
    """JavaScript: a digest of the pixels of the image `selector` finds, null until loaded."""
    return f"""() => {{
    const img = document.querySelector('{selector}');
    if (!img || !img.complete || !img.naturalWidth) return null;
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    let digest = 0;
    for (const value of context.getImageData(0, 0, canvas.width, canvas.height).data) {{
        digest = (digest * 31 + value) >>> 0;
    }}
    return digest;
}}"""


RECONSTRUCTION_DIGEST = digest("img.capsule-reconstruction")
FIGURE_4_DIGEST = digest("img.figure-4")
PAIR_INPUT_DIGEST = digest("img.pair-input")

# Shares of the pixels of the pair's reconstructions that are clearly red and clearly green
# (one channel over the other by a quarter of the range); null until the image has loaded.
PAIR_COLOURS = """() => {
    const img = document.querySelector('img.pair-reconstruction');
    if (!img || !img.complete || !img.naturalWidth) return null;
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
    const context = canvas.getContext('2d');
    context.drawImage(img, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let red = 0, green = 0;
    for (let i = 0; i < pixels.length; i += 4) {
        red += pixels[i] > pixels[i + 1] + 64;
        green += pixels[i + 1] > pixels[i] + 64;
    }
    return [red / (pixels.length / 4), green / (pixels.length / 4)];
}"""


def move_the_second_digit(page) -> tuple[str, str, int]:
    """Drag "Two digits at once"'s right-offset slider by 60 px once the pair is drawn; wait
    for the input picture to change and the caption to say where the slider stopped. Returns
    the caption before and after, and the slider's readout."""
    caption = page.locator(".pair-caption")
    caption.get_by_text(PAIRED).first.wait_for()
    before, picture = caption.inner_text(), page.wait_for_function(PAIR_INPUT_DIGEST).json_value()
    slider = page.locator(".pair-controls .widget-slider").nth(1)
    drag_handle(page, slider, 60)
    page.wait_for_function(f"(({PAIR_INPUT_DIGEST})() ?? {picture}) !== {picture}")
    right = int(readout(slider))  # the kernel redraws each value the handle passed, in order
    caption.get_by_text(f"moved {right:+d} px right").first.wait_for()
    return before, caption.inner_text(), right


def draw_on_canvas(page, stroke: list[tuple[float, float]]) -> tuple[str, float]:
    """Clear the canvas, draw one stroke through `stroke` (fractions of the canvas's side) with
    the mouse; return the line the notebook printed for the drawing, and the seconds from the
    end of the stroke until that line showed."""
    line = page.get_by_text(re.compile(r"drawing: predicted"))
    page.locator("button.capsnet-clear").click()
    line.wait_for(state="detached")
    canvas = page.locator("canvas.capsnet-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=4)
    page.mouse.up()
    start = time.perf_counter()
    line.wait_for()
    return LINE.search(line.inner_text())[0], time.perf_counter() - start


def drag_handle(page, slider, dx: float) -> None:
    """Drag a slider's handle `dx` px to the right with the mouse, as a person does."""
    handle = slider.locator(".noUi-handle")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y, steps=5)
    page.mouse.up()


def readout(slider) -> float:
    """A FloatSlider's displayed value (d3-format writes minus as U+2212)."""
    return float(slider.locator(".widget-readout").inner_text().replace("\u2212", "-"))


def drag_strongest_slider(page, label: str) -> tuple[float, float]:
    """Once the sliders hold the drawing's capsule (`label`), drag the slider of the dimension
    the notebook names by 40 px; wait for the reconstruction to change. Returns the slider's
    readout before and after."""
    text = page.get_by_text(re.compile(rf"drawing, capsule {re.escape(label)}: dimension"))
    dim = int(STRONGEST.search(text.inner_text())[3])
    before = page.wait_for_function(RECONSTRUCTION_DIGEST).json_value()
    slider = page.locator(".capsule-sliders .widget-slider").nth(dim)
    start = readout(slider)
    drag_handle(page, slider, 40)
    page.wait_for_function(f"(({RECONSTRUCTION_DIGEST})() ?? {before}) !== {before}")
    return start, readout(slider)


def save_screenshot(page, path: Path) -> None:
    """The drawing with its prediction above the sliders, as one PNG (the README's picture)."""
    parts = []
    for inside in ("canvas.capsnet-canvas", ".capsule-sliders"):
        output = page.locator(".jp-OutputArea-output", has=page.locator(inside))
        output.scroll_into_view_if_needed()
        parts.append(Image.open(io.BytesIO(output.screenshot())).convert("RGB"))
    gap = 16
    width, height = max(part.width for part in parts), sum(part.height + gap for part in parts)
    picture = Image.new("RGB", (width + 2 * gap, height + gap), "white")
    top = gap
    for part in parts:
        picture.paste(part, (gap, top))
        top += part.height + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=True)


@pytest.mark.slow
@pytest.mark.browser
def test_notebook_in_jupyterlab(playwright_api, jupyterlab, tiny_checkpoint, tmp_path):
    """Run All; move the second digit of "Two digits at once"; upload two photos, draw a 1 and a
    0 with the mouse, drag a capsule's slider, upload the same two photos again. Prints the time
    from the end of a stroke to its prediction; saves a screenshot where
    CAPSNET_NOTEBOOK_SCREENSHOT names a file."""
    url, checkpoint = jupyterlab
    uploads = [
        tmp_path / "upload_test_7.jpg",
        tmp_path / "upload_test_2.png",
    ]  # names no sample has
    shutil.copy(REPO / "samples" / "7_blue_ballpoint.jpg", uploads[0])
    shutil.copy(REPO / "samples" / "2_scan_16bit.png", uploads[1])
    screenshot = os.environ.get("CAPSNET_NOTEBOOK_SCREENSHOT")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            run_all(page, url)
            canvas_depth = page.evaluate(CANVAS_DEPTH)
            first_figure_4 = page.wait_for_function(FIGURE_4_DIGEST).json_value()
            pair_colours = page.wait_for_function(PAIR_COLOURS).json_value()
            paired = move_the_second_digit(page)
            lines = upload(page, uploads)
            figure_ink = page.evaluate(FIGURE_INK)
            wait_for_caption(page, uploads[-1].name)
            page.locator(".pair-caption").get_by_text(f"{uploads[-1].name} + ").first.wait_for()
            drawn, seconds = zip(*[draw_on_canvas(page, stroke) for stroke in (ONE, ZERO)])
            readouts = drag_strongest_slider(page, LINE.fullmatch(drawn[-1])[2])
            figure_4 = page.wait_for_function(FIGURE_4_DIGEST).json_value()
            stretch = page.wait_for_function(IMAGE_STRETCH).json_value()  # all loaded
            if screenshot:
                save_screenshot(page, Path(screenshot))
            upload(page, uploads)  # the same files again: the sliders go back to the last
            wait_for_caption(page, uploads[-1].name)
        except playwright_api.Error:
            page.screenshot(path=tmp_path / "failure.png")
            raise
        finally:
            browser.close()
    print(f"stroke to prediction: {', '.join(f'{s:.2f} s' for s in seconds)}")
    print(f"the canvas starts {canvas_depth:.2f} screens down the notebook")
    assert canvas_depth < 3, canvas_depth  # within the first screens, past 4 samples
    assert len(figure_ink) == len(uploads) and min(figure_ink) > 0.05, figure_ink
    assert readouts[1] > readouts[0], readouts
    assert figure_4 != first_figure_4  # Figure 4 followed the drawing
    for name in ("capsule-digit", "capsule-reconstruction", "figure-4", "pair-input"):
        assert stretch[name][0] == pytest.approx(1, abs=0.02), stretch
    assert stretch["capsule-reconstruction"][1:] == pytest.approx([140, 140], abs=1), stretch
    assert stretch["pair-reconstruction"] == pytest.approx([1, 180, 180], abs=0.02), stretch
    # Two digits at once: both colours drawn; the slider moved the second digit right.
    assert min(pair_colours) > 0.05, pair_colours
    before, after, right = paired
    assert PAIRED.match(before).group(1, 2, 3) == (SAMPLES[0].name, SECOND_DIGIT, "+0"), before
    assert right > 0 and PAIRED.match(after).group(3) == f"{right:+d}", (after, right)
    if checkpoint != tiny_checkpoint:
        assert [LINE.fullmatch(line)[2] for line in lines] == ["7", "2"], lines
        assert [LINE.fullmatch(line)[2] for line in drawn] == ["1", "0"], drawn
