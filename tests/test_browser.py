"""What users look at, in a real browser: the MLflow UI after a smoke sweep, and the offline HTML report.

Headless Chromium (the Debian package ``chromium``) is driven over the DevTools protocol with aiohttp's
websocket client (aiohttp comes with MLflow), so no browser driver package is needed. Screenshots go to a
temporary folder, or to the README's ``docs/img/`` with ``DECONVLAB_UPDATE_SCREENSHOTS=1`` (so that a test run
does not rewrite tracked files). Skips when Chromium is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import start_local_ray
from deconvlab.sweep.records import child_runs

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
# Flags for a quiet, sandbox-free, offline-friendly headless browser (root in CI, no display).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
UI_START_TIMEOUT_S = 240  # `mlflow ui` spawns several workers; seen taking 90 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it spawned (MLflow's workers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Chromium:
    """One headless Chromium tab, driven over the DevTools protocol.

    Args:
        profile: a fresh user-data directory.
        width, height: the viewport.
    """

    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        self.port, self.size = free_port(), (width, height)
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={self.port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.loop = asyncio.new_event_loop()
        self.events: list[dict] = []
        self._id = 0
        try:
            wait_http(f"http://127.0.0.1:{self.port}/json/version", 60, self.process)
            self.loop.run_until_complete(self._connect())
        except BaseException:
            self.close()
            raise

    async def _connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as answer:
            targets = await answer.json(content_type=None)
        page = next(t for t in targets if t["type"] == "page")
        # Screenshots of long pages are tens of MB of base64: no message size limit.
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _send(self, method: str, params: dict) -> dict:
        self._id += 1
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive(timeout=120)).data)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)  # events (network requests...) arriving meanwhile

    def send(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._send(method, params))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout_s: float = 60.0):
        """Poll a JavaScript expression until it is truthy; return its value. Errors count as false:
        while a page loads, ``document.body`` may not exist yet."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.3)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise TimeoutError(f"{expression} stayed false for {timeout_s:.0f} s; the page shows:\n{text}")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """Save a PNG of the viewport, or of the whole page."""
        width, height = self.size
        if full_page:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        if full_page:
            self.send("Emulation.clearDeviceMetricsOverride")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.loop.run_until_complete(self.ws.close())
        if getattr(self, "session", None) is not None:
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        stop(self.process)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: the README's images only when asked to refresh them."""
    return DOCS_IMG if os.environ.get("DECONVLAB_UPDATE_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("shots")


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    browser = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The quickstart sweep with --smoke-test in a throwaway MLflow store."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    import ray

    from deconvlab.sweep.runner import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "DECONVLAB_ARTIFACT_ROOT": str(root / "mlartifacts")}
    start_local_ray()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            outcome = run_sweep("quickstart", smoke_test=True, storage_path=str(root / "ray"), quiet=True)
    finally:
        ray.shutdown()
    from mlflow.tracking import MlflowClient

    return outcome, MlflowClient(env["MLFLOW_TRACKING_URI"]), env, root


@pytest.fixture(scope="module")
def mlflow_ui(smoke_sweep):
    """``deconvlab ui --port P`` on a free loopback port against the smoke sweep's store."""
    _, _, env, root = smoke_sweep
    port = free_port()
    log = open(root / "ui.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen([sys.executable, "-m", "deconvlab.cli", "ui", "--port", str(port)],
                               env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", UI_START_TIMEOUT_S, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


def _hide_assistant(chromium: Chromium) -> None:
    # MLflow 3 opens an assistant side panel; close it so the screenshots show the runs.
    chromium.evaluate("""(() => { const close = document.querySelector(
        'button[data-component-id="mlflow.assistant.chat_panel.close"]'); if (close) close.click(); })()""")
    time.sleep(1)  # let the layout settle


def test_ui_shows_the_sweep_its_parent_run_and_every_child_run(smoke_sweep, mlflow_ui, chromium, shots):
    outcome, client, _, _ = smoke_sweep
    experiment = client.get_experiment_by_name(outcome.experiment_name)
    parent = client.get_run(outcome.parent_run_id)
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    chromium.open(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs")
    chromium.wait_for(f"document.body.innerText.includes({json.dumps(parent.info.run_name)})", 120)
    assert outcome.experiment_name in chromium.text()
    # Child runs are nested under the parent: expand it and every trial's run appears beneath.
    chromium.evaluate("""document.querySelector('button[data-component-id*="runnamecellrenderer"]').click()""")
    names = [c.info.run_name for c in children]
    chromium.wait_for(f"{json.dumps(names)}.every(n => document.body.innerText.includes(n))", 60)
    _hide_assistant(chromium)
    chromium.screenshot(shots / "mlflow_sweep_runs.png")


# The text of a run's cell in a grid column, and whether it is in sight: inside the viewport and not covered
# (the grid splits a row between a pinned container (the name) and the scrolled one, joined by row-index).
CELL_IN_SIGHT = """((runName, colId) => {
    const name = [...document.querySelectorAll('.ag-row [col-id="attributes.`Run Name`"]')]
        .find(cell => cell.innerText.split('\\n').map(line => line.trim()).includes(runName));
    if (!name) return null;
    const index = name.closest('.ag-row').getAttribute('row-index');
    const cell = [...document.querySelectorAll(`.ag-row[row-index="${index}"] [col-id]`)]
        .find(c => c.getAttribute('col-id') === colId);
    if (!cell) return null;
    const box = cell.getBoundingClientRect();
    const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
    return {text: cell.innerText.trim(), row: Number(index), inSight: box.left >= 0 && box.right <= innerWidth
            && box.top >= 0 && box.bottom <= innerHeight && !!hit && cell.contains(hit)};
})"""


def cell(chromium: Chromium, run_name: str, column_id: str) -> dict | None:
    return chromium.evaluate(f"{CELL_IN_SIGHT}({json.dumps(run_name)}, {json.dumps(column_id)})")


def test_ui_opens_the_sweeps_comparison_from_its_url(smoke_sweep, mlflow_ui, tmp_path, shots):
    """The URL a sweep prints, in a fresh browser and without a click: the trials best first, a trial's metric
    and sampled value in sight; the same view's charts: the metric per epoch of every trial, parallel coordinates."""
    from deconvlab.sweep.ui_view import publish_sweep_view

    outcome, client, _, _ = smoke_sweep
    links = publish_sweep_view(client, outcome.parent_run_id, mlflow_ui)
    trials = sorted(child_runs(client, client.get_run(outcome.parent_run_id).info.experiment_id,
                               outcome.parent_run_id), key=lambda r: r.info.run_name)
    best = client.get_run(outcome.best_run_id)
    metric = client.get_run(outcome.parent_run_id).data.params["sweep.metric"]
    sampled = sorted(k for k in best.data.params if k.startswith("sampled."))[0]
    browser = Chromium(tmp_path / "fresh-profile")
    try:
        browser.open(links.table)
        browser.wait_for(f"{CELL_IN_SIGHT}({json.dumps(best.info.run_name)}, 'metrics.`best/{metric}`')", 120)
        time.sleep(1)  # the grid lays out its columns after the first rows appear
        value = cell(browser, best.info.run_name, f"metrics.`best/{metric}`")
        param = cell(browser, best.info.run_name, f"params.`{sampled}`")
        rows = browser.evaluate("""[...document.querySelectorAll('.ag-row [col-id="attributes.`Run Name`"]')]
            .map(cell => cell.innerText.trim().split('\\n').pop().trim())""")
        _hide_assistant(browser)  # checked in sight with it open; the screenshot shows more columns without
        browser.screenshot(shots / "mlflow_sweep_comparison.png")
        browser.open(links.charts)
        browser.wait_for("document.body.innerText.includes('Parallel Coordinates')", 120)
        browser.wait_for(f"{json.dumps([f'{t.info.run_name} ({metric})' for t in trials])}"
                         ".every(n => document.body.innerText.includes(n))", 60)
        time.sleep(2)  # let the plots draw
        browser.screenshot(shots / "mlflow_sweep_charts.png")
    finally:
        browser.close()
    assert value["row"] == 0 and value["inSight"], value  # the best trial on top, its metric in sight
    assert abs(float(value["text"]) - best.data.metrics[f"best/{metric}"]) < 1e-3
    assert param["inSight"] and param["text"] == best.data.params[sampled], param
    assert sorted(rows) == [t.info.run_name for t in trials]  # every trial, and only the trials


def test_ui_displays_the_parent_runs_pareto_plot_image(smoke_sweep, mlflow_ui, chromium, shots):
    outcome, client, _, _ = smoke_sweep
    experiment = client.get_experiment_by_name(outcome.experiment_name)
    artifact = "leaderboard/pareto.png"
    chromium.open(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{outcome.parent_run_id}"
                  f"/artifacts/{artifact}")
    # The image is fetched from the server and decoded: it has a real size in the page.
    width = chromium.wait_for(f"""(() => {{ const img = document.querySelector('img[alt="{artifact}"]');
        return img && img.complete && img.naturalWidth; }})()""", 120)
    assert width > 300
    text = chromium.text()
    assert "parallel_coordinates.png" in text and "report.html" in text and "best_trial" in text
    _hide_assistant(chromium)
    chromium.screenshot(shots / "mlflow_sweep_pareto.png")


def test_report_reads_offline_in_a_browser(smoke_sweep, chromium, tmp_path, shots):
    outcome, _, env, _ = smoke_sweep
    from deconvlab.sweep.report import write_report

    report = write_report(outcome.parent_run_id, tmp_path / "report.html", env["MLFLOW_TRACKING_URI"])
    chromium.send("Network.enable")
    chromium.send("Network.emulateNetworkConditions", offline=True, latency=0, downloadThroughput=-1,
                  uploadThroughput=-1)
    chromium.events.clear()
    try:
        chromium.open(report.as_uri())
        chromium.wait_for("document.readyState === 'complete' && !!document.getElementById('leaderboard')")
        images = chromium.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
        rows = chromium.evaluate("document.querySelectorAll('#leaderboard tr').length")
        chromium.screenshot(shots / "report.png", full_page=True)
    finally:
        chromium.send("Network.emulateNetworkConditions", offline=False, latency=0, downloadThroughput=-1,
                      uploadThroughput=-1)
    assert rows == 1 + len(outcome.leaderboard)
    assert len(images) >= 3 and all(done and width > 0 for done, width in images)
    requested = [e["params"]["request"]["url"] for e in chromium.events if e.get("method") ==
                 "Network.requestWillBeSent"]
    assert requested and all(url.startswith(("file:", "data:")) for url in requested)
    assert outcome.best_trial in chromium.text()
