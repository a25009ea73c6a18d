"""A real browser: JupyterLab runs notebooks/03_patches on a tiny study, and moving the attention
panel's block slider changes the attention map that plotly draws.

Needs Debian's chromium at /usr/bin/chromium and Playwright from pip (`make test` installs both);
never `playwright install`. Skips, saying which is missing, when either is not there.
"""
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from notebook_fixtures import BIN, ROOT, jupyter_env, make_study

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PLOT = ".bwssl-attention-panel .js-plotly-plot"
# the heat map's z and the title of the panel's plotly graph, as the browser holds them
READ_MAP = f"""() => {{
    const gd = document.querySelector({json.dumps(PLOT)});
    const heat = gd && gd.data && gd.data.find(t => t.type === "heatmap");
    return heat ? {{z: heat.z, title: gd.layout.title.text}} : null;
}}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, token: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a folder with the notebook and a tiny study at its default
    paths (runs/study-demo, data/synth); Jupyter's own folders are temporary. Yields (url, token)."""
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium (make env installs Debian's chromium with apt-get)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-test.txt)")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    make_study(root)
    shutil.copy(ROOT / "notebooks" / "03_patches.ipynb", root)
    env = jupyter_env(tmp / "jupyter")
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"  # no "notified about Jupyter news?" toast
    labconfig.mkdir()
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "lab.log", "w")
    server = subprocess.Popen(
        [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _api(f"{url}/api/status", token)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        try:
            for kernel in _api(f"{url}/api/kernels", token) or []:
                _api(f"{url}/api/kernels/{kernel['id']}", token, method="DELETE")
        except OSError:
            pass
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.mark.timeout(300)
def test_block_slider_changes_the_attention_map(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/03_patches.ipynb?token={token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
            page.evaluate("""async () => {
                const ctx = window.jupyterapp.shell.currentWidget.sessionContext;
                await ctx.ready;
                await window.jupyterapp.commands.execute("notebook:run-all-cells");
            }""")
            page.wait_for_selector(PLOT, timeout=180_000)
            panel = page.locator(".bwssl-attention-panel")
            panel.locator("select").first.select_option(label="bwssl-k2")
            page.wait_for_function(f"() => ({READ_MAP})()?.title.startsWith('bwssl-k2, block 0')", timeout=30_000)
            before = page.evaluate(READ_MAP)

            handle = panel.locator(".widget-slider").filter(has=page.get_by_text("block", exact=True)) \
                .locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("ArrowRight")  # noUiSlider's keyboard step: block 0 -> 1
            page.wait_for_function(f"() => ({READ_MAP})()?.title.startsWith('bwssl-k2, block 1')", timeout=30_000)
            after = page.evaluate(READ_MAP)
        finally:
            browser.close()
    assert len(before["z"]) == len(after["z"]) == 4  # H' rows of the tiny preset's 4 x 4 grid
    assert after["z"] != before["z"], "the attention map did not change with the block"
