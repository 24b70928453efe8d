"""The pack in ComfyUI's real frontend, driven in headless Chromium as a user would.

Steps (one screenshot each in out/browser/): 1. the page loads, the pack's scripts load and log no
error; 2. the node library search "PlugKit" lists every PlugKit node; 3. every workflow in
workflows/ opens (Workflow > Open) with no missing-node/model dialog (the server has every model file
under the name the workflow uses: random weights), runs from the Run button, the queue shows it
finished with its output image and every image output node (SaveImage, PreviewImage: the PnP
feature map) shows its picture; on a CPU the page shortens the opened graph first, as a user would
edit widgets (at most 4 steps, 128 px, an ImageScale after each Load Image), leaving the file as
shipped; 4. every PlugKit node's help page renders its js/docs/<NodeId>.md; 5. the template browser
lists every workflow under the pack, each with its thumbnail; 6. with the interface switched to
Chinese (Comfy.Locale = zh) the node library shows our Chinese node names and the help page
js/docs/<NodeId>/zh.md. A deliberately broken workflow proves the missing-node check fails.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "ComfyUI-PlugKit"  # the folder name tools.harness.server links the pack under

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
RUN_TIMEOUT = 3600  # seconds per workflow: 2 shared CPU cores, full-size SD1.5; never a pass/fail criterion

# The page-side twin of tools.workflows.builder.shorten: edits the opened graph's widgets as a user would.
SHORTEN_JS = """
const [CAPS, SIZE] = args; const changes = []; const g = app.graph;
const link = id => (typeof g.links.get === 'function' ? g.links.get(id) : g.links[id]);
for (const n of [...g.nodes]) {
  for (const w of n.widgets ?? []) {
    const cap = (w.name in CAPS) ? CAPS[w.name]
      : (n.type === 'EmptyLatentImage' && ['width', 'height'].includes(w.name)) ? SIZE : null;
    if (cap !== null && typeof w.value === 'number' && w.value > cap) {
      changes.push(`${n.type} #${n.id}: ${w.name} ${w.value} -> ${cap}`); w.value = cap;
    }
  }
  if (n.type === 'LoadImage') {
    const targets = (n.outputs[0].links ?? []).map(link).filter(Boolean).map(l => [l.target_id, l.target_slot]);
    const sc = LiteGraph.createNode('ImageScale'); g.add(sc);
    sc.pos = [n.pos[0], n.pos[1] + 340];
    const set = (name, v) => { sc.widgets.find(w => w.name === name).value = v; };
    set('upscale_method', 'area'); set('width', SIZE); set('height', 0); set('crop', 'disabled');
    n.connect(0, sc, 0);
    for (const [tid, slot] of targets) sc.connect(0, g.getNodeById(tid), slot);
    changes.push(`LoadImage #${n.id}: scaled to ${SIZE} px wide`);
  }
}
g.setDirtyCanvas(true, true);
return changes;
"""


def shorten_in_page(page) -> list[str]:
    """On a CPU (random weights): shorten the open graph in the page; with CUDA run it as shipped."""
    import torch

    from tools.workflows.builder import CPU_CAPS, CPU_SIZE

    if torch.cuda.is_available():
        return []
    return page.ajs(SHORTEN_JS, CPU_CAPS, CPU_SIZE)


def plugkit_nodes(server) -> dict[str, dict]:
    """Node id -> /object_info entry for every node the pack registers on the server."""
    info = server.object_info()
    ids = {k for k, v in info.items()
           if k.startswith("PlugKit") or str(v.get("python_module", "")).endswith(PACK)}
    return {k: info[k] for k in sorted(ids)}


def _get(server, path: str, timeout: float = 30):
    """GET from the server; None when it does not answer in time (it may be busy computing)."""
    import urllib.error

    try:
        return server.get(path, timeout=timeout)
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError):
        if server.proc is not None and server.proc.poll() is not None:
            raise AssertionError(f"ComfyUI died:\n{server.log_text()[-4000:]}") from None
        return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def core_workflow(server, path: Path) -> Path:
    """A core-nodes-only workflow, used only while workflows/ is empty."""
    from tools.fixtures.models import CHECKPOINT_NAME
    from tools.workflows.builder import Workflow

    wf = Workflow(server.object_info())
    ckpt = wf.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME)
    pos = wf.add("CLIPTextEncode", clip=ckpt[1], text="a photo of a cat")
    neg = wf.add("CLIPTextEncode", clip=ckpt[1], text="blurry")
    lat = wf.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = wf.add("KSampler", model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=lat[0],
                seed=1, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    dec = wf.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    wf.add("SaveImage", images=dec[0], filename_prefix="browser_core")
    return wf.save(path)


@pytest.fixture
def any_workflow(server, tmp_path) -> Path:
    """The first shipped workflow, or a core one while workflows/ is empty."""
    return WORKFLOWS[0] if WORKFLOWS else core_workflow(server, tmp_path / "core_graph.json")


# --------------------------------------------------------------------------------------------
# 1. the page loads; the pack's scripts load and log no error
# --------------------------------------------------------------------------------------------
def test_page_loads_without_pack_errors(page, server):
    page.shot("01_page_loaded")
    entries = page.collect_console()
    pack_scripts = [e for e in server.get("/extensions") if f"/extensions/{PACK}/" in e]
    shipped = sorted(p.name for p in (REPO / "js").glob("*.js"))
    assert sorted(s.rsplit("/", 1)[-1] for s in pack_scripts) == shipped, pack_scripts
    assert "PlugKit.TextOutput" in page.js("return app.extensions.map(e => e.name)"), \
        "js/plugkit.js did not register its extension"
    errors = [e["message"] for e in entries if e.get("level") == "SEVERE"
              and re.search(r"plugkit", e.get("message", ""), re.I)
              and not (e["message"].startswith("http") and not e["message"].startswith(server.url))]
    assert not errors, "browser console errors from the pack:\n" + "\n".join(errors)


# --------------------------------------------------------------------------------------------
# 2. the node library lists every PlugKit node
# --------------------------------------------------------------------------------------------
def search_node_library(page, query: str) -> list[str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page.close_dialogs()
    page.sidebar("node-library")
    box = page.wait_for("the node library search box", lambda: next(
        (e for e in page.d.find_elements(By.CSS_SELECTOR, ".sidebar-content-container input.search-box-input,"
                                                          " .sidebar-content-container input[role=combobox]")
         if e.is_displayed()), None))
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(query)
    time.sleep(1.5)  # debounced search
    return page.js(f"return [...document.querySelectorAll({LIBRARY_LEAVES!r})]"
                   ".map(li => li.getAttribute('aria-label') || li.innerText.trim())")


# The node library's node entries: PrimeVue tree leaves up to frontend 1.3x; since the new design
# (1.4x+) tree items with the node icon (folders have another icon).
LIBRARY_LEAVES = (".sidebar-content-container li.p-tree-node-leaf,"
                  " .sidebar-content-container [role=treeitem]:has(> i[class*=comfy--node])")

HELP_JS = """
// The help page of node type args[0] (display name args[1]). Frontend 1.3x: the node library
// entry's help button opens it in the sidebar. Since 1.4x: select the node on the canvas, open the
// right side panel and its Info tab (the node library has no help button any more).
const [nid, label] = args;
const li = [...document.querySelectorAll('.sidebar-content-container li.p-tree-node-leaf')]
  .find(li => li.getAttribute('aria-label') === label);
const b = li && li.querySelector('.help-button');
if (b) { b.click(); return 'sidebar'; }
if (li) return null;
const n = LiteGraph.createNode(nid); if (!n) return null;
n.pos = [100, 100]; app.graph.add(n); app.canvas.deselectAll?.(); app.canvas.selectNode(n);
window.__plugkitHelpNode = n;
await app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', true);
for (let i = 0; i < 40 && !document.querySelector('.node-help-content'); i++) {
  const tabs = [...document.querySelectorAll('[role=tab]')].filter(t => t.offsetParent);
  const info = tabs.find(t => /^(Info|信息)$/.test(t.innerText.trim())) || tabs[Math.floor(i / 4) % Math.max(tabs.length, 1)];
  if (info) info.click();
  await new Promise(r => setTimeout(r, 250));
}
return document.querySelector('.node-help-content') ? 'panel' : null;
"""

CLOSE_HELP_JS = """
const b = document.querySelector('.sidebar-content-container .pi-arrow-left');
if (b) b.closest('button').click();
const n = window.__plugkitHelpNode;
if (n) { app.graph.remove(n); window.__plugkitHelpNode = null;
         await app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false); }
"""


def open_help(page, nid: str, label: str):
    """Open node ``nid``'s help page as a user does; returns where it opened, or None."""
    search_node_library(page, "PlugKit")
    return page.ajs(HELP_JS, nid, label)


def help_html(page, label: str, where: str):
    """The rendered help page, once it has loaded (in the sidebar its heading is the node's name)."""
    head = ("const head = c && c.parentElement.querySelector('.font-semibold');"
            "if (arguments[1] === 'sidebar' && !(head && head.innerText.trim() === arguments[0])) return null;")
    return page.wait_for(f"the help page of {label}", lambda: page.js(
        "const c = document.querySelector('.node-help-content');" + head +
        "return c && c.innerText.trim() && !c.querySelector('.p-progressspinner, [class*=animate-spin]')"
        " ? c.innerHTML : null", label, where), timeout=30)


def test_node_library_lists_every_plugkit_node(page, server):
    nodes = plugkit_nodes(server)
    assert nodes, "the server registers no PlugKit node"
    listed = search_node_library(page, "PlugKit")
    page.shot("02_node_library_search")
    want = {nid: (info.get("display_name") or nid) for nid, info in nodes.items()}
    missing = {nid: name for nid, name in want.items() if name not in listed}
    assert not missing, f"node library search 'PlugKit' does not list {missing}; it lists {listed}"
    for name in set(want.values()):
        assert listed.count(name) >= list(want.values()).count(name)


# --------------------------------------------------------------------------------------------
# 3. every workflow opens with no missing-node dialog and runs from the page
# --------------------------------------------------------------------------------------------
def run_from_page(page, server, path: Path, name: str) -> dict:
    ui = json.loads(Path(path).read_text())
    page.open_workflow_file(path)
    page.check_workflow_loaded(ui, name)
    page.fit_view()
    page.shot(f"03_{name}_opened")
    changes = shorten_in_page(page)
    if changes:
        print(f"{name}: shortened in the page for the CPU: " + "; ".join(changes))

    def queue_ids():
        q = _get(server, "/queue") or {}
        return [item[1] for item in q.get("queue_running", []) + q.get("queue_pending", [])]

    history = None
    for _ in range(10):
        history = _get(server, "/history", timeout=60)
        if history is not None:
            break
    assert history is not None, "the server did not answer GET /history"
    before = set(history) | set(queue_ids())
    page.click_run()

    def queued():  # the prompt this click queued: one the server did not know before
        ids = queue_ids() + list(_get(server, "/history") or ())
        return next((i for i in ids if i not in before), None)

    try:
        prompt_id = page.wait_for(f"{name} to be queued", queued, timeout=180, interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; open dialogs: {page.dialogs()}") from None
    entry = server.wait(prompt_id, RUN_TIMEOUT)  # raises with the server's error if it failed
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"{name} finished but produced no image"

    # The page: the queue (frontend 1.3x; the Assets tab, which lists generated outputs, since the
    # queue tab went in 1.4x) shows the finished job with its output image ...
    page.sidebar("queue" if page.js("return app.extensionManager.sidebarTab.sidebarTabs"
                                    ".some(t => t.id === 'queue')") else "assets")
    names = [img["filename"] for img in images]
    shown = page.wait_for(f"{name}'s output image in the queue", lambda: page.js(
        "return [...document.querySelectorAll('.sidebar-content-container img')]"
        ".filter(i => i.complete && i.naturalWidth > 0"
        " && arguments[0].some(n => i.src.includes('filename=' + encodeURIComponent(n))))"
        ".map(i => i.src)", names), timeout=120)
    assert shown
    # ... and the output nodes on the canvas show their images, PlugKit nodes their text.
    for node_id, out in entry["outputs"].items():
        if out.get("images"):
            page.wait_for(f"node {node_id} to show its image", lambda: page.js(
                "const n = app.graph.getNodeById(Number(arguments[0]));"
                "return !!n && ((n.imgs && n.imgs.length > 0)"
                " || !!app.nodeOutputs?.[String(arguments[0])]?.images?.length)", node_id), timeout=60)
        node_type = page.js("return app.graph.getNodeById(Number(arguments[0]))?.type ?? ''", node_id)
        if out.get("text") and node_type.startswith("PlugKit"):
            want = "\n".join(str(t) for t in out["text"])
            got = page.wait_for(f"node {node_id} to show its text", lambda: page.js(
                "return app.graph.getNodeById(Number(arguments[0]))"
                ".widgets?.find(w => w.name === 'plugkit_text')?.value", node_id), timeout=30)
            assert got == want
    image_nodes = {str(n["id"]) for n in ui["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    shown_nodes = {nid for nid, out in entry["outputs"].items() if out.get("images")}
    assert image_nodes <= shown_nodes, f"{name}: image output nodes {sorted(image_nodes - shown_nodes)} showed nothing"
    page.fit_view()
    page.shot(f"03_{name}_finished")
    errors = page.script_errors()
    assert not errors, f"{name}: browser console errors from the pack's scripts:\n" + "\n".join(errors)
    return entry


@pytest.mark.parametrize("path", WORKFLOWS or [None], ids=[p.stem for p in WORKFLOWS] or ["core_graph"])
def test_workflow_opens_and_runs_from_page(page, server, path, tmp_path):
    if path is None:  # workflows/ is still empty: exercise the same path with core nodes
        path = core_workflow(server, tmp_path / "core_graph.json")
    entry = run_from_page(page, server, path, _slug(path.stem))
    ui = json.loads(path.read_text())
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    previews = [str(l[3]) for l in ui["links"] if types.get(l[1]) == "PlugKitFeatureMap"
                and types.get(l[3]) == "PreviewImage"]
    if "PlugKitFeatureMap" in types.values():  # the feature-map preview appears on the canvas
        assert previews, f"{path.name}: the feature map feeds no PreviewImage"
        for nid in previews:
            assert entry["outputs"].get(nid, {}).get("images"), f"{path.name}: no feature-map preview image"
            assert page.js("const n = app.graph.getNodeById(Number(arguments[0]));"
                           "return !!n && ((n.imgs && n.imgs.length > 0)"
                           " || !!app.nodeOutputs?.[String(arguments[0])]?.images?.length)", nid)
        page.shot(f"03_{_slug(path.stem)}_feature_map_preview")


def test_missing_node_is_detected(page, server, any_workflow, tmp_path):
    """A copy of a workflow naming a node id that does not exist must fail the check above."""
    ui = json.loads(any_workflow.read_text())
    target = next(n for n in ui["nodes"] if n["type"] not in ("Note", "MarkdownNote"))
    target["type"] = "PlugKitDoesNotExist"
    broken = tmp_path / f"broken_{any_workflow.name}"
    broken.write_text(json.dumps(ui))
    page.open_workflow_file(broken)
    page.shot("03_broken_workflow_missing_nodes")
    with pytest.raises(AssertionError, match="PlugKitDoesNotExist"):
        page.check_workflow_loaded(ui, broken.stem)
    dialog = page.missing_dialog()
    assert dialog and "PlugKitDoesNotExist" in dialog, page.dialogs()
    page.close_notices()
    page.close_dialogs()


def test_text_output_shown_on_node_and_never_saved(page, server):
    """js/plugkit.js: a PlugKit node's ui text output (PreviewText) appears on the node, and is
    neither saved in the workflow nor sent to the server."""
    node_type = "PlugKitPluginSelector" if "PlugKitPluginSelector" in plugkit_nodes(server) \
        else next(iter(plugkit_nodes(server)))
    page.close_dialogs()
    res = page.ajs("""
        const n = LiteGraph.createNode(args[0]); app.graph.add(n);
        const before = JSON.stringify(n.serialize().widgets_values ?? []);
        n.onExecuted({text: ['derain 0.91\\ndesnow 0.12']});
        const w = n.widgets.find(w => w.name === 'plugkit_text');
        const after = JSON.stringify(n.serialize().widgets_values ?? []);
        const prompt = await app.graphToPrompt();
        const inputs = prompt.output[String(n.id)]?.inputs ?? {};
        app.graph.setDirtyCanvas(true, true);
        return {value: w?.value ?? null, before, after, sent: Object.keys(inputs),
                shown: !!document.querySelector('textarea[data-plugkit=text-output]')};
    """, node_type)
    page.shot("03_text_output_on_node")
    assert res["value"] == "derain 0.91\ndesnow 0.12", res
    assert res["shown"], res
    assert res["before"] == res["after"], res
    assert "plugkit_text" not in res["sent"], res


# --------------------------------------------------------------------------------------------
# 4. the help page of every PlugKit node renders its js/docs/<NodeId>.md
# --------------------------------------------------------------------------------------------
def _md_heading(md: str) -> str:
    """The first line of text of a markdown page, as the rendered page shows it."""
    for line in md.splitlines():
        text = re.sub(r"^\s*(#+|[-*>]|\d+\.)\s*", "", line)
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
        text = re.sub(r"[*_`]", "", text).strip()
        if text and not text.startswith("<"):
            return text
    return ""


def test_help_pages_render(page, server):
    nodes = plugkit_nodes(server)
    no_page = [nid for nid in nodes if not (REPO / "js" / "docs" / f"{nid}.md").is_file()]
    failures = []
    for nid, info in nodes.items():
        label = info.get("display_name") or nid
        where = open_help(page, nid, label)
        if not where:
            failures.append(f"{nid}: no help page for {label!r} (node library help button or Info panel)")
            continue
        html = help_html(page, label, where)
        text = page.js("return document.querySelector('.node-help-content').innerText")
        page.shot(f"04_help_{nid}")
        page.ajs(CLOSE_HELP_JS)  # back to the node library / the empty canvas
        md_path = REPO / "js" / "docs" / f"{nid}.md"
        if nid in no_page:
            continue
        heading = _md_heading(md_path.read_text())
        if 'fallback-content' in html or 'markdown-content' not in html:
            failures.append(f"{nid}: the help panel shows the generic fallback, not {md_path.name}")
        elif heading not in text:
            failures.append(f"{nid}: the help panel does not show {heading!r} from {md_path.name}")
        elif re.search(r"^#{1,6} ", text, re.M):
            failures.append(f"{nid}: the help panel shows raw markdown")
    if no_page:
        failures.append(f"PlugKit nodes without a help page js/docs/<NodeId>.md: {no_page}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------
# 5. the template browser lists the workflows under the pack
# --------------------------------------------------------------------------------------------
def test_workflows_in_template_browser(page, server):
    workflows = sorted((REPO / "workflows").glob("*.json"))
    if not workflows:
        pytest.skip("workflows/ has no workflow yet")
    names = sorted(p.stem for p in workflows)
    listing = server.get("/workflow_templates")
    assert sorted(listing.get(PACK, [])) == names, listing
    for p in workflows:
        served = server.get(f"/api/workflow_templates/{PACK}/{p.name}")
        assert served == json.loads(p.read_text()), f"{p.name} is served differently"

    page.close_dialogs()
    page.click(".templates-tab-button, button[aria-label=Templates]")  # frontend 1.3x, 1.4x+
    dlg = ("[...document.querySelectorAll('.p-dialog, [role=dialog]')]"
           ".find(d => d.querySelector('[role=button], button') && /Templates/.test(d.innerText))")
    page.wait_for("the template browser", lambda: page.js(f"return !!{dlg}"), timeout=60)
    time.sleep(1.0)
    clicked = page.js(
        f"const dlg = {dlg};"
        "const el = [...dlg.querySelectorAll('*')]"
        ".filter(e => e.children.length === 0 && e.textContent.trim() === arguments[0]);"
        "if (!el.length) return false; (el[0].closest('button, a, [role=button], li') || el[0]).click();"
        "return true", PACK)
    assert clicked, f"the template browser has no category {PACK!r}"
    time.sleep(1.5)
    text = page.js(f"return {dlg}.innerText")
    page.shot("05_template_browser")
    absent = [n for n in names if n not in text]
    assert not absent, f"the template browser does not show {absent} under {PACK}"
    # ... each with its thumbnail <name>.jpg, served from workflows/ and shown as a loaded image.
    for n in names:
        thumb = REPO / "workflows" / f"{n}.jpg"
        assert thumb.is_file(), f"no thumbnail {thumb.name}"
        assert server.get(f"/api/workflow_templates/{PACK}/{n}.jpg") == thumb.read_bytes(), f"{n}.jpg is served differently"
    # The frontend fetches each thumbnail and shows it from a blob: URL, so a card is matched by its
    # title and its picture by size (our thumbnails are 512x384, unlike any placeholder).
    from PIL import Image as _Image

    thumb_js = (f"const dlg = {dlg};"
                "const t = [...dlg.querySelectorAll('*')].find(e => e.children.length === 0"
                " && e.textContent.trim() === arguments[0]);"
                "let card = t; while (card && card !== dlg && !card.querySelector('img')) card = card.parentElement;"
                "const img = card && card !== dlg ? card.querySelector('img') : null;"
                "if (!img) return null; img.scrollIntoView({block: 'center'});"
                "return img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null")
    for n in names:
        with _Image.open(REPO / "workflows" / f"{n}.jpg") as im:
            size = list(im.size)
        got = page.wait_for(f"the thumbnail of {n}", lambda: page.js(thumb_js, n), timeout=60)
        assert got == size, f"{n}: the card shows a {got} picture, not its {size} thumbnail"
    page.shot("05_template_browser_thumbnails")

    # Open the first one through the template browser (its own loading path).
    ui = json.loads(workflows[0].read_text())
    page.js(f"const dlg = {dlg};"
            "const el = [...dlg.querySelectorAll('*')]"
            ".find(e => e.children.length === 0 && e.textContent.trim() === arguments[0]);"
            "el.click();", names[0])
    page.wait_for("the template to load", lambda: not page.js(f"return !!{dlg}")
                  and page.js("return app.graph.nodes.length") == len(ui["nodes"]), timeout=60)
    time.sleep(1.5)
    page.check_workflow_loaded(ui, names[0])
    page.fit_view()
    page.shot("05_template_opened")


# --------------------------------------------------------------------------------------------
# 6. the interface in Chinese shows our node names and help pages (locales/zh, js/docs/<id>/zh.md)
# --------------------------------------------------------------------------------------------
def test_chinese_interface_shows_our_node_names_and_help(page, server):
    zh = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    nodes = plugkit_nodes(server)
    page.close_dialogs()
    page.ajs("await app.extensionManager.setting.set('Comfy.Locale', 'zh');")
    try:
        page.open_app()  # node definitions are translated when the page registers them: reload
        page.close_dialogs()
        want = {nid: zh[nid]["display_name"] for nid in nodes}
        listed = page.wait_for("the Chinese node names in the node library", lambda: (
            lambda got: got if all(name in got for name in want.values()) else None)(
                search_node_library(page, "PlugKit")), timeout=90, interval=1.0)
        page.shot("06_chinese_node_library")
        assert all(name in listed for name in want.values()), (want, listed)

        nid = "PlugKitChangeMap" if "PlugKitChangeMap" in nodes else next(iter(nodes))
        label = want[nid]
        found = page.ajs(HELP_JS, nid, label)
        assert found, f"no help page for {label!r}"
        heading = _md_heading((REPO / "js" / "docs" / nid / "zh.md").read_text(encoding="utf-8"))
        page.wait_for(f"the Chinese help page of {nid}", lambda: page.js(
            "const c = document.querySelector('.node-help-content');"
            "return !!c && c.innerText.includes(arguments[0])", heading), timeout=30)
        page.shot("06_chinese_help_page")
        page.ajs(CLOSE_HELP_JS)
    finally:
        page.ajs("await app.extensionManager.setting.set('Comfy.Locale', 'en');")
        page.open_app()
