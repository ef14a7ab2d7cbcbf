"""TuneKit in a real browser: ComfyUI's own frontend (comfyui-frontend-package) in Debian's Chromium, driven
by Playwright the way a user works: the templates browser lists the example, the example JSON is dropped onto
the page, loads with no missing node types, runs from the Run button and writes its sample image and LoRA.

Chromium is Debian's package (/usr/bin/chromium, which tools/run_tests.py installs with apt-get when it can);
Playwright's own browser download is never used. On failure a screenshot lands in the test's tmp_path.
"""
import contextlib
import json
import re
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed in this venv: run `python3 tools/run_tests.py` "
           "(or `python3 tools/comfy_host.py provision --test-deps`), which installs the test packages")

pytestmark = pytest.mark.every_host  # both frontends: 1.32.9 (0.3.75) and 1.58.1 (0.30.0)
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "example_workflows" / "train_lora_then_sample.json"
CHROMIUM = Path("/usr/bin/chromium")
# Flags for this sandbox (no network beyond registries, root, no screen): without the background-networking
# ones Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # page and app start; the workflow itself is awaited on the server's history
# Records every workflow load by the workflow's id: beforeConfigureGraph and afterConfigureGraph receive the
# same array of missing node types that loadGraphData collects and its missing-nodes dialog shows. A plain
# frontend extension, registered from the test; loads of other graphs (the app's own start-up) are ignored.
LOAD_PROBE = """() => {
    window.__tunekitLoads = [];
    window.app.registerExtension({
        name: "TuneKit.Test.LoadProbe",
        beforeConfigureGraph(graphData, missing) {
            window.__tunekitLoads.push({ id: graphData?.id ?? null, missing, done: false });
        },
        afterConfigureGraph(missing) {
            const load = window.__tunekitLoads.find((l) => l.missing === missing);
            if (load) load.done = true;
        },
    });
}"""
# What a user's drag-and-drop delivers: a File in a DataTransfer, dropped onto the canvas (the frontend
# listens on the document and runs app.handleFile -> loadGraphData).
DROP_FILE = """([name, text]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], name, { type: "application/json" }));
    const canvas = document.querySelector("#graph-canvas") || document.body;
    canvas.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""
SET_WIDGET = """([type, name, value]) => {
    const widget = window.app.graph.nodes.find((n) => n.type === type).widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value);
}"""
# The frontend asks the Comfy registry (api.comfy.org) which pack each node of a loaded workflow comes from;
# the server's CSP (--disable-api-nodes) or this closed network blocks that. Such failed remote fetches are
# reported, not failures: any other new console error is.
BLOCKED_FETCH = re.compile(r"(?:Connecting to|Refused to connect to) '([^']+)' violates .*Content Security Policy")
# What the monitor shows on Train LoRA once the run is done: its validation points, its latest sample (loaded
# from /view) and whether drawing the node (chart and sample) goes through without an error.
MONITOR_SHOWN = """() => {
    const node = window.app.graph.nodes.find((n) => n.type === "TuneKitTrainLoRA");
    const monitor = node.tunekitMonitor;
    const image = monitor?.samples?.[0];
    if (!monitor || !image?.complete || !image.naturalWidth) return null;
    node.onDrawForeground(document.createElement("canvas").getContext("2d"));
    return { validation: monitor.validation.map(([step]) => step), sampleStep: monitor.sampleStep,
             sampleSrc: image.src, roomy: node.size[1] >= node.computeSize()[1] + 70 };
}"""
GRAPH_NODES = """() => window.app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, comfyClass: n.comfyClass ?? null, hasErrors: !!n.has_errors }))"""


def _with_monitor(workflow: dict) -> dict:
    """The example with a Sample & Validate Settings node on Train LoRA's monitor input (every step, one
    1-step sample, one held-out image), as a user would add it."""
    train = next(node for node in workflow["nodes"] if node["type"] == "TuneKitTrainLoRA")
    node_id, link_id = workflow["last_node_id"] + 1, workflow["last_link_id"] + 1
    workflow["nodes"].append({
        "id": node_id, "type": "TuneKitSampleAndValidate", "pos": [60, 600], "size": [320, 400], "flags": {},
        "order": 0, "mode": 0, "inputs": [],
        "outputs": [{"name": "monitor", "type": "TUNEKIT_MONITOR", "slot_index": 0, "links": [link_id]}],
        "properties": {"Node name for S&R": "TuneKitSampleAndValidate"},
        # every, prompts, negative_prompt, seed, steps, cfg, sampler_name, scheduler, width, height,
        # validation_count, validation_seed
        "widgets_values": [1, "tkdemo", "", 0, 1, 1.0, "euler", "normal", 64, 64, 1, 0],
    })
    train["inputs"].append({"name": "monitor", "type": "TUNEKIT_MONITOR", "link": link_id})
    workflow["links"].append([link_id, node_id, 0, train["id"], len(train["inputs"]) - 1, "TUNEKIT_MONITOR"])
    workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id
    return workflow


def _open_app(page, url: str) -> None:
    """Load the page and wait until the app has set up and opened its first workflow (a new user's is empty)."""
    page.goto(url)
    page.wait_for_function("() => window.app?.graph && window.app.extensionManager?.workflow?.activeWorkflow")
    page.wait_for_load_state("networkidle")


def _drop_workflow(page, name: str, text: str) -> list[str]:
    """Drop a workflow file onto the page, wait until it is loaded; return the missing node types reported."""
    workflow_id = json.loads(text)["id"]
    page.evaluate(DROP_FILE, [name, text])
    page.wait_for_function("(id) => window.__tunekitLoads.some((l) => l.id === id && l.done)", arg=workflow_id)
    return page.evaluate("""(id) => window.__tunekitLoads.find((l) => l.id === id && l.done)
        .missing.map((m) => (typeof m === "string" ? m : m.type))""", workflow_id)


def _get_json(comfy, path: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    with opener.open(comfy.url + path, timeout=30) as response:
        return json.loads(response.read())


class ConsoleErrors:
    """Console errors and uncaught exceptions of a page, each tagged with the phase it happened in."""

    def __init__(self, page):
        self.phase = "bare page"
        self.entries: list[tuple[str, str, str]] = []  # (phase, first line of the text, source url)
        page.on("console", lambda msg: msg.type == "error" and self._add(msg.text, msg.location.get("url", "")))
        page.on("pageerror", lambda error: self._add(f"uncaught {error.name}: {error.message}", ""))

    def _add(self, text: str, url: str) -> None:
        self.entries.append((self.phase, (text.splitlines() or [""])[0].strip(), url))

    def keys(self) -> set[tuple[str, str]]:
        return {(text, url) for _, text, url in self.entries}

    def remote_fetches(self, local_url: str) -> set[tuple[str, str]]:
        """Errors that are only a blocked or failed request to another host than the page's."""
        local = urlsplit(local_url).netloc
        found = set()
        for text, url in self.keys():
            blocked = BLOCKED_FETCH.match(text)
            target = blocked[1] if blocked else url if text.startswith("Failed to load resource: net::") else None
            if target and urlsplit(target).netloc not in ("", local):
                found.add((text, url))
        return found

    def report(self) -> str:
        return "\n".join(f"  [{phase}] {text}  ({url})" for phase, text, url in self.entries) or "  (none)"


@contextlib.contextmanager
def _screenshot_on_failure(page, folder: Path, errors: ConsoleErrors):
    try:
        yield
    except BaseException:
        shot = folder / "failure.png"
        with contextlib.suppress(Exception):
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the page at the failure: {shot}")
        print(f"console errors:\n{errors.report()}")
        raise


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's Chromium is not installed ({CHROMIUM}): `python3 tools/run_tests.py` installs it "
                    "with apt-get when run as root; otherwise `apt-get install chromium`")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def test_templates_api_lists_the_example(comfy):
    """What the frontend's templates browser fetches: custom-node folders with an example_workflows/ folder."""
    templates = _get_json(comfy, "/api/workflow_templates")
    assert DEMO.stem in templates.get("ComfyUI-TuneKit", []), templates


def test_example_workflow_drops_in_loads_and_runs_in_the_browser(comfy, demo_files, page, tmp_path):
    errors = ConsoleErrors(page)
    with _screenshot_on_failure(page, tmp_path, errors):
        # 1. The bare page: its console errors (404s of optional user files, the core templates package the
        #    test host leaves out), with the templates browser's below, are the baseline. TuneKit's web
        #    extension must be loaded, and silent throughout.
        new_user = not _get_json(comfy, "/api/settings/Comfy.TutorialCompleted")  # the app opens templates then
        _open_app(page, comfy.url)
        assert page.evaluate("() => window.app.extensions.some((e) => e.name === 'TuneKit.TrainingProgress')")

        # 2. The templates browser (the app opens it for a new user; else the sidebar's button) shows the example.
        errors.phase = "templates browser"
        # Frontend 1.32.9 (0.3.75) and 1.58.1 (0.30.0) both show it as a dialog; 1.58.1 lists the pack
        # under "Extensions" beside its popular templates.
        templates = page.get_by_role("dialog").filter(has=page.get_by_text(DEMO.stem, exact=True))
        if not new_user:
            page.get_by_role("button", name="Templates", exact=True).click()
        sync_api.expect(templates.get_by_text("ComfyUI-TuneKit", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        sync_api.expect(templates.get_by_text(DEMO.stem, exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        close = templates.locator("button:has(i.pi-times)")  # 1.32.9's (x) button; 1.58.1 closes on Escape
        close.first.click() if close.count() else page.keyboard.press("Escape")
        sync_api.expect(templates).to_have_count(0, timeout=TIMEOUT_MS)

        # 3. Drop the example JSON onto the page: no missing node types, every node created with its type.
        baseline = errors.keys()
        errors.phase = "workflow"
        workflow = _with_monitor(json.loads(DEMO.read_text(encoding="utf-8")))
        ids = {node["type"]: str(node["id"]) for node in workflow["nodes"]}  # node id by type
        page.evaluate(LOAD_PROBE)
        missing = _drop_workflow(page, DEMO.name, json.dumps(workflow))
        assert missing == [], f"the frontend reported missing node types: {missing}"
        assert page.locator(".comfy-missing-nodes").count() == 0, "a missing-nodes dialog is open"
        created = {str(node["id"]): node for node in page.evaluate(GRAPH_NODES)}  # 1.58.1 ids are strings
        assert {i: n["type"] for i, n in created.items()} == {str(n["id"]): n["type"] for n in workflow["nodes"]}
        assert not [n for n in created.values() if n["hasErrors"]], created
        tunekit = [created[str(n["id"])] for n in workflow["nodes"] if n["type"].startswith("TuneKit")]
        assert tunekit and all(n["comfyClass"] == n["type"] for n in tunekit), tunekit  # built from the server's defs

        # 4. Turn the steps down (the full example runs in test_example_workflows.py), then press Run;
        #    the server's history says when it is done.
        steps = 2
        for node_type in ("TuneKitTrainLoRA", "KSampler"):
            page.evaluate(SET_WIDGET, [node_type, "steps", steps])
        loras = comfy.models_dir / "loras"
        before = set(loras.glob("*.safetensors"))
        # The top bar's Run button: 1.32.9 wraps it in data-testid=queue-button, 1.58.1 does not.
        run = page.get_by_role("button", name="Run", exact=True).filter(visible=True).first
        with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as sent:
            run.click()
        assert sent.value.ok, sent.value.text()
        prompt = sent.value.request.post_data_json["prompt"]  # the frontend's graphToPrompt; the Note stays behind
        assert {i: node["class_type"] for i, node in prompt.items()} == {
            str(n["id"]): n["type"] for n in workflow["nodes"] if n["type"] != "Note"}
        assert [prompt[ids[t]]["inputs"]["steps"] for t in ("TuneKitTrainLoRA", "KSampler")] == [steps, steps]
        history = comfy.wait(sent.value.json()["prompt_id"], timeout=300)
        assert history["status"]["status_str"] == "success", history["status"]

        images = [path for path in comfy.output_files(history) if path.suffix == ".png"]
        assert len(images) == 1 and images[0].name.startswith("tunekit_sample") and images[0].is_file(), images
        new = sorted(set(loras.glob("*.safetensors")) - before)
        assert len(new) == 1 and new[0].name.startswith("tunekit_demo_lora"), new
        # The page got the results too: the sample on Save Image, the last training step on Train LoRA.
        page.wait_for_function("(id) => window.app.nodeOutputs[id]?.images?.length === 1", arg=ids["SaveImage"])
        status = page.wait_for_function(
            "() => window.app.graph.nodes.find((n) => n.type === 'TuneKitTrainLoRA').tunekitStatus").json_value()
        assert re.fullmatch(rf"step {steps}/{steps} · loss \d+\.\d+", status), status
        # The monitor's chart and latest sample on Train LoRA (events tunekit.validation / tunekit.sample).
        shown = page.wait_for_function(MONITOR_SHOWN).json_value()
        assert shown["validation"] == list(range(steps + 1)) and shown["sampleStep"] == steps, shown
        assert shown["roomy"] and "step_000002_00.png" in shown["sampleSrc"], shown

        # 5. Nothing logged an error the bare page does not log (failed fetches of remote hosts aside),
        #    and nothing of TuneKit's ever did.
        remote = errors.remote_fetches(comfy.url)
        print("blocked fetches of remote hosts (not failures):\n" + "\n".join(f"  {t}" for t, _ in sorted(remote)))
        own = errors.keys() - remote
        assert not own - baseline, f"console errors beyond the bare page's:\n{errors.report()}"
        assert not [key for key in own if "tunekit" in " ".join(key).lower()], errors.report()


def test_missing_node_types_are_reported_by_the_frontend(comfy, page, tmp_path):
    """The check above can fail: an unknown type in a dropped workflow is reported and shown in the dialog."""
    errors = ConsoleErrors(page)
    with _screenshot_on_failure(page, tmp_path, errors):
        _open_app(page, comfy.url)
        page.evaluate(LOAD_PROBE)
        workflow = json.loads(DEMO.read_text(encoding="utf-8"))
        workflow["id"] = "5e1f0a2b-0000-4000-8000-000000000001"
        next(n for n in workflow["nodes"] if n["type"] == "TuneKitTrainLoRA")["type"] = "NoSuchNodeFromAMissingPack"
        assert _drop_workflow(page, "broken.json", json.dumps(workflow)) == ["NoSuchNodeFromAMissingPack"]
        # 1.32.9 opens its missing-nodes dialog; 1.58.1 shows a "Missing node: <type>" notice.
        shown = page.locator(".comfy-missing-nodes").or_(page.get_by_text("Missing node: NoSuchNodeFromAMissingPack"))
        sync_api.expect(shown.first).to_contain_text("NoSuchNodeFromAMissingPack", timeout=TIMEOUT_MS)
        assert any(n["hasErrors"] for n in page.evaluate(GRAPH_NODES))
