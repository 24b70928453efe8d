"""Real-browser harness: Debian's Chromium (headless) driven by Selenium + chromedriver against
the real ComfyUI server (``server`` fixture) and its real frontend.

Install what it needs with ``tests/browser/install.sh`` (apt: chromium, chromium-driver; pip:
selenium). Without a browser the tests skip locally and FAIL under ``CI=true``.
Screenshots and the browser console go to ``out/browser/`` (or ``$PLUGKIT_BROWSER_OUT``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-PlugKit"  # the folder name tools.harness.server links the pack under
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--disable-dev-shm-usage", "--window-size=1920,1080",
    # The frontend calls api.comfy.org (release notes, node registry); the machine has no
    # internet: resolve every name but the loopback server to "not found", without DNS.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
# The Run button: frontend 1.32 (ComfyUI 0.3.75) has a PrimeVue split button in .comfyui-queue-button;
# 1.48+ (ComfyUI 0.33) a button with data-testid="queue-button".
RUN_BUTTON = ".comfyui-queue-button button.p-splitbutton-button, [data-testid=queue-button]"
DIALOGS = ".p-dialog, [role=dialog]"
MISSING_RE = re.compile(r"missing (custom )?nodes?\b|missing models?\b|not installed", re.I)


def _unavailable(msg: str):
    full = (f"browser test cannot run: {msg}. Install with `bash tests/browser/install.sh` "
            "(apt: chromium chromium-driver; pip: selenium).")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(full, pytrace=False)
    pytest.skip(full)


def _find_browser() -> tuple[str, str]:
    chromium = os.environ.get("PLUGKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = (os.environ.get("PLUGKIT_CHROMEDRIVER") or shutil.which("chromedriver")
              or "/usr/bin/chromedriver")
    if not Path(chromium).is_file():
        _unavailable(f"no Chromium at {chromium}")
    if not Path(driver).is_file():
        _unavailable(f"no chromedriver at {driver}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _unavailable("the Python package selenium is not installed")
    return chromium, driver


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    out = Path(os.environ.get("PLUGKIT_BROWSER_OUT") or REPO / "out" / "browser")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    return out


class Page:
    """One Chromium tab on the ComfyUI frontend, with the helpers the tests share."""

    def __init__(self, driver, server, shots: Path):
        self.d, self.server, self.shots = driver, server, shots
        self.console: list[dict] = []  # every browser console entry seen so far

    # -- basics ----------------------------------------------------------------------------
    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def ajs(self, body: str, *args):
        """Run an async JS function body; ``args`` is visible as ``args``. Errors raise."""
        res = self.d.execute_async_script(
            "const done = arguments[arguments.length - 1]; const args = [...arguments].slice(0, -1);"
            "(async () => {" + body + "})().then(v => done({ok: v}), e => done({err: String(e && e.stack || e)}));",
            *args)
        if "err" in res:
            raise AssertionError(f"page script failed: {res['err']}")
        return res["ok"]

    def wait_for(self, what: str, fn, timeout: float = 60, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(interval)
        self.shot(f"timeout_{re.sub(r'[^A-Za-z0-9]+', '_', what)[:40]}")
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path

    def collect_console(self) -> list[dict]:
        entries = self.d.get_log("browser")
        self.console.extend(entries)
        with open(self.shots / "console.log", "a") as f:
            for e in entries:
                f.write(f"{e.get('level')}\t{e.get('message')}\n")
        return entries

    def script_errors(self) -> list[str]:
        """Console errors raised from the pack's own scripts since the last collection."""
        return [e["message"] for e in self.collect_console() if e.get("level") == "SEVERE"
                and re.search(rf"/extensions/{PACK}/\S*\.js", e.get("message", ""))]

    def click(self, css: str):
        from selenium.webdriver.common.by import By

        el = self.wait_for(f"element {css}", lambda: next(
            (e for e in self.d.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()), None))
        el.click()
        return el

    # -- ComfyUI frontend ------------------------------------------------------------------
    def click_run(self):
        """Click the Run button (queues the open workflow), as a user does."""
        return self.click(RUN_BUTTON)

    def open_app(self):
        self.d.get(self.server.url + "/")
        self.wait_for("the ComfyUI app", lambda: self.js(
            "return !!(window.app && app.graph && app.extensionManager && window.LiteGraph"
            " && LiteGraph.registered_node_types.KSampler"
            " && document.querySelector(arguments[0]))", RUN_BUTTON), timeout=180)
        # Draw node details at every zoom level, so fitted screenshots of big graphs stay legible.
        self.ajs("await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);")
        time.sleep(1.0)  # let the first-run dialogs and extension setup settle

    def dialogs(self) -> list[str]:
        """Texts of the open dialogs (PrimeVue's .p-dialog up to frontend 1.3x, role=dialog since)."""
        return self.js(f"return [...document.querySelectorAll({DIALOGS!r})]"
                       ".filter(d => d.offsetParent !== null || d.getClientRects().length)"
                       ".map(d => d.innerText)")

    def missing_dialog(self) -> str | None:
        """The text of a 'missing nodes' / 'missing models' dialog (frontend 1.3x) or notice (1.4x+
        show a banner, "Missing node: X"), if one is shown."""
        for text in self.dialogs():
            if MISSING_RE.search(text):
                return text
        notices = self.js(
            "const re = new RegExp(arguments[0], 'i');"
            "return [...document.querySelectorAll('body *')]"
            ".filter(e => e.children.length === 0 && e.offsetParent !== null && re.test(e.textContent))"
            ".map(e => (e.parentElement?.parentElement || e).innerText)", MISSING_RE.pattern)
        return notices[0] if notices else None

    def close_notices(self):
        """Dismiss 'missing ...' notices (frontend 1.4x+ banners), so they do not outlive their workflow."""
        self.js(
            "const re = new RegExp(arguments[0], 'i');"
            "for (const e of [...document.querySelectorAll('body *')].filter(e => e.children.length === 0"
            "     && e.offsetParent !== null && re.test(e.textContent))) {"
            "  let box = e; for (let i = 0; i < 5 && box; i++, box = box.parentElement) {"
            "    const b = [...box.querySelectorAll('button')].find(b => /close|dismiss/i.test("
            "        (b.getAttribute('aria-label') || '') + ' ' + (b.title || '')));"
            "    if (b) { b.click(); break; } } }", MISSING_RE.pattern)
        time.sleep(0.5)

    def close_dialogs(self):
        for _ in range(5):
            if not self.dialogs():
                return
            self.js("""
              for (const d of document.querySelectorAll(arguments[0])) {
                const b = d.querySelector('.p-dialog-close-button, [data-pc-section=pcclosebutton],'
                    + ' button[aria-label=Close], button[aria-label=close], button[aria-label="Close dialog"]')
                  || [...d.querySelectorAll('button')].find(b => /\\bright-6\\b/.test(b.className));
                if (b) b.click();
              }""", DIALOGS)
            time.sleep(0.7)
            if self.dialogs():  # a dialog without a close button we know: Escape, as a user would
                from selenium.webdriver.common.action_chains import ActionChains
                from selenium.webdriver.common.keys import Keys

                ActionChains(self.d).send_keys(Keys.ESCAPE).perform()
                time.sleep(0.7)
        assert not self.dialogs(), f"could not close the dialogs: {self.dialogs()}"

    def sidebar(self, tab: str):
        """Open a sidebar tab ('node-library', 'queue', 'templates' ...) by clicking its button."""
        if self.js("return app.extensionManager.sidebarTab.activeSidebarTabId") != tab:
            self.click(f".{tab}-tab-button, [data-testid={tab}-tab-button]")  # frontend 1.3x, 1.4x+
        self.wait_for(f"the {tab} sidebar", lambda: self.js(
            "return app.extensionManager.sidebarTab.activeSidebarTabId === arguments[0]"
            " && !!document.querySelector('.sidebar-content-container')", tab))
        time.sleep(0.5)

    def fit_view(self):
        self.ajs("await app.extensionManager.command.execute('Comfy.Canvas.FitView');")
        time.sleep(0.5)

    def open_workflow_file(self, path: Path):
        """Open a workflow file as a user does (Workflow > Open: the page's file input)."""
        from selenium.webdriver.common.by import By

        self.close_dialogs()
        inp = self.d.find_element(By.CSS_SELECTOR, "#comfy-file-input")
        inp.send_keys(str(Path(path).resolve()))
        ui = json.loads(Path(path).read_text())
        n_nodes = len(ui.get("nodes", []))
        stem = Path(path).stem
        self.wait_for(f"{Path(path).name} on the canvas", lambda: self.js(
            "return app.extensionManager.workflow.activeWorkflow?.filename === arguments[0]"
            " && app.graph.nodes.length === arguments[1]", stem, n_nodes), timeout=60)
        time.sleep(1.5)  # dialogs open after the graph is configured

    def check_workflow_loaded(self, ui: dict, name: str):
        """Raise AssertionError if the frontend reported missing nodes/models for this workflow."""
        dialog = self.missing_dialog()
        unknown = self.js("return app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                          ".map(n => n.type)")
        expected = sorted({n["type"] for n in ui["nodes"]})
        loaded = sorted(set(self.js("return app.graph.nodes.map(n => n.type)")))
        problems = []
        if dialog:
            problems.append(f"the frontend opened a dialog: {dialog!r}")
        if unknown:
            problems.append(f"node types unknown to the frontend: {sorted(set(unknown))}")
        if loaded != expected:
            problems.append(f"loaded node types {loaded} != the file's {expected}")
        if problems:
            raise AssertionError(f"{name}: " + "; ".join(problems))


@pytest.fixture(scope="module")
def page(server, shots_dir, tmp_path_factory):
    chromium, driver_path = _find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(driver_path, log_output=str(shots_dir / "chromedriver.log"))
    try:
        drv = webdriver.Chrome(options=opts, service=service)
    except Exception as e:  # the browser is there but does not start: always an error
        pytest.fail(f"Chromium did not start ({chromium}, {driver_path}): {e}", pytrace=False)
    drv.set_script_timeout(120)
    p = Page(drv, server, shots_dir)
    (shots_dir / "console.log").write_text("")
    try:
        p.open_app()
        yield p
    finally:
        try:
            p.collect_console()
        finally:
            drv.quit()
