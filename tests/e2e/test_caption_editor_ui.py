"""The caption editor in Debian's Chromium on the real frontend (tests/e2e/test_ui.py has the browser setup),
driven the way a user edits: the node's button opens it on a generated dataset; a caption is edited, a word
bulk-replaced, a trigger word added (undone, added again), the grid filtered by a tag, the unsaved-changes
warning shown, and Save writes the files checked on disk. Screenshots are kept in the test's tmp_path."""
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from .test_caption_routes import REPO, _request
from .test_ui import (  # noqa: F401
    LOAD_PROBE,
    ConsoleErrors,
    _drop_workflow,
    _open_app,
    _screenshot_on_failure,
    browser,
    page,
    sync_api,
)

UI_IMAGES = 60  # more than one page of the editor's grid (48)
# Where the "Edit captions" button of the node is drawn, in page pixels: the widget's place on the node,
# through the canvas's pan and zoom, plus the canvas's place on the page.
# The view is first set to 100% with the node near the top left (a loaded workflow may be zoomed in on it).
BUTTON_POINT = """(label) => {
    const node = window.app.graph.nodes.find((n) => n.type === "TuneKitDatasetFromFolder");
    window.app.canvas.ds.scale = 1;
    window.app.canvas.ds.offset = [100 - node.pos[0], 100 - node.pos[1]];
    window.app.canvas.draw(true, true);  // lays the widgets out at this scale
    const widget = node.widgets.find((w) => w.name === label);
    const y = (widget.y ?? widget.last_y) + (window.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20) / 2;
    const [x, top] = window.app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + y]);
    const rect = window.app.canvas.canvas.getBoundingClientRect();
    return [rect.left + x, rect.top + top];
}"""
# Whether a click at this page point reaches the graph canvas: for a moment after a workflow loads, the
# frontend's loading mask (PrimeVue BlockUI) fades out over the whole page and takes any click there.
CANVAS_AT = "([x, y]) => document.elementFromPoint(x, y) === window.app.canvas.canvas"


def _ui_dataset(folder: Path) -> None:
    """Pictures a person can tell apart in a screenshot; even ones 'a photo of a dog, grass', odd ones
    'a dog, snow', image 5 without a caption file."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(UI_IMAGES):
        sky = ((index * 53) % 200 + 40, (index * 97) % 200 + 40, 200)
        image = Image.new("RGB", (192, 144), sky)
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 100, 192, 144], fill=(60, 160, 70) if index % 2 == 0 else (235, 235, 245))
        draw.ellipse([60 + index % 40, 50, 120 + index % 40, 110], fill=(120, 80, 40))
        image.save(folder / f"dog_{index:03d}.png")
        if index != 5:
            caption = "a photo of a dog, grass" if index % 2 == 0 else "a dog, snow"
            (folder / f"dog_{index:03d}.txt").write_text(caption, encoding="utf-8")


def _click_canvas(tab, point: list[float]) -> None:
    """A user's click at a point of the graph canvas once nothing covers it there (a locator's click waits
    for that itself; the mouse clicks wherever it is told)."""
    tab.wait_for_function(CANVAS_AT, arg=point)
    tab.mouse.click(*point)


def _settled_screenshot(tab, path: Path) -> None:
    """A screenshot once the tag list has caught up (it follows edits a moment later) and the thumbnails shown
    have loaded."""
    sync_api.expect(tab.locator(".tunekit-captions .tk-tags li").first).to_contain_text("tkcap")
    tab.wait_for_function("() => [...document.querySelectorAll('.tk-card img')].slice(0, 15).every((i) => i.complete)")
    tab.screenshot(path=str(path))


def _one_node_workflow(folder: str) -> dict:
    example = json.loads((REPO / "example_workflows" / "train_lora_then_sample.json").read_text(encoding="utf-8"))
    node = next(n for n in example["nodes"] if n["type"] == "TuneKitDatasetFromFolder")
    node.update(id=1, pos=[200, 150], order=0, widgets_values=[folder, "", ".txt", "error"])
    node["outputs"][0]["links"] = None
    return {"id": "5e1f0a2b-0000-4000-8000-00000000ca97", "revision": 0, "last_node_id": 1, "last_link_id": 0,
            "nodes": [node], "links": [], "groups": [], "config": {}, "extra": {}, "version": 0.4}


@pytest.mark.every_host
def test_editor_edits_bulk_replaces_adds_a_trigger_and_saves(comfy, page, tmp_path):  # noqa: F811 (fixture)
    folder = comfy.input_dir / "tk_captions_ui"
    _ui_dataset(folder)
    errors = ConsoleErrors(page)
    editor = page.locator(".tunekit-captions")
    cards = editor.locator(".tk-card")
    counts = editor.locator(".tk-counts")
    status = editor.locator(".tk-status")
    # A new user gets the templates browser over the page a moment after start: this user has seen it.
    assert _request(comfy, "/api/settings/Comfy.TutorialCompleted", True)[0] == 200
    with _screenshot_on_failure(page, tmp_path, errors):
        _open_app(page, comfy.url)
        page.evaluate(LOAD_PROBE)
        assert _drop_workflow(page, "captions.json", json.dumps(_one_node_workflow(folder.name))) == []

        # The node's button opens the editor: the first page of the grid, every image counted, tags listed.
        _click_canvas(page, page.evaluate(BUTTON_POINT, "Edit captions"))
        sync_api.expect(counts).to_have_text(f"{UI_IMAGES}/{UI_IMAGES} images · 0 unsaved")
        sync_api.expect(cards).to_have_count(48)
        sync_api.expect(editor.locator(".tk-tags li").first).to_contain_text("a dog")
        page.wait_for_function("() => [...document.querySelectorAll('.tk-card img')].slice(0, 8).every((i) => i.complete && i.naturalWidth > 0)")

        # Click a card and type: one unsaved caption. The keyboard moves between cards and pages.
        first = cards.nth(0).locator("textarea")
        cards.nth(0).locator(".tk-name").click()
        sync_api.expect(first).to_be_focused()
        first.press("Control+a")
        first.type("a photo of a brown dog, grass, sunny")
        first.press("Escape")  # leaves the text for the card
        sync_api.expect(cards.nth(0)).to_be_focused()
        sync_api.expect(counts).to_have_text(f"{UI_IMAGES}/{UI_IMAGES} images · 1 unsaved")
        page.keyboard.press("ArrowRight")
        sync_api.expect(cards.nth(1)).to_be_focused()
        page.keyboard.press("PageDown")
        sync_api.expect(cards).to_have_count(UI_IMAGES - 48)
        sync_api.expect(editor.locator(".tk-pager")).to_contain_text("page 2 / 2")
        page.keyboard.press("PageUp")
        sync_api.expect(cards.nth(1)).to_be_focused()

        # Bulk replace 'dog' by 'cat', add the trigger word everywhere, undo once, add it again.
        editor.locator(".tk-find").fill("dog")
        editor.locator(".tk-replacement").fill("cat")
        editor.locator(".tk-replace-all").click()
        sync_api.expect(status).to_have_text(f"replace: {UI_IMAGES - 1} caption(s) changed (unsaved).")
        editor.locator(".tk-trigger").fill("tkcap")
        editor.locator(".tk-add-trigger").click()
        sync_api.expect(status).to_have_text(f"add trigger: {UI_IMAGES} caption(s) changed (unsaved).")
        sync_api.expect(first).to_have_value("tkcap, a photo of a brown cat, grass, sunny")
        editor.locator(".tk-undo").click()
        sync_api.expect(first).to_have_value("a photo of a brown cat, grass, sunny")
        editor.locator(".tk-add-trigger").click()
        sync_api.expect(first).to_have_value("tkcap, a photo of a brown cat, grass, sunny")

        # A tag of the frequency list filters the grid; a second click shows everything again.
        snow = editor.locator(".tk-tags li", has_text="snow")
        snowy = UI_IMAGES // 2 - 1  # the odd images but the one without a caption
        sync_api.expect(snow).to_contain_text(str(snowy))
        snow.click()
        sync_api.expect(counts).to_contain_text(f"{snowy}/{UI_IMAGES} images")
        sync_api.expect(cards.first.locator("textarea")).to_have_value("tkcap, a cat, snow")
        _settled_screenshot(page, tmp_path / "caption_editor_filtered.png")
        editor.locator(".tk-tags li", has_text="snow").click()
        sync_api.expect(counts).to_have_text(f"{UI_IMAGES}/{UI_IMAGES} images · {UI_IMAGES} unsaved")

        # Closing with unsaved changes asks first; staying keeps every edit.
        dialogs = []
        page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        editor.locator(".tk-close").click()
        assert dialogs and "unsaved" in dialogs[0], dialogs
        sync_api.expect(editor).to_be_visible()
        _settled_screenshot(page, tmp_path / "caption_editor.png")
        assert not list(folder.glob("*.txt.*")) and (folder / "dog_000.txt").read_text() == "a photo of a dog, grass"

        # Ctrl+S (here from a card) saves every changed caption file (and the one that was missing), and only
        # the editor sees it: the frontend's own Ctrl+S (save the workflow) opens no dialog.
        cards.nth(2).focus()
        page.keyboard.press("Control+s")
        sync_api.expect(status).to_have_text(f"Saved: {UI_IMAGES} caption file(s) written, 0 unchanged.")
        sync_api.expect(counts).to_have_text(f"{UI_IMAGES}/{UI_IMAGES} images · 0 unsaved")
        on_disk = {p.stem: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
        assert len(on_disk) == UI_IMAGES
        assert on_disk["dog_000"] == "tkcap, a photo of a brown cat, grass, sunny"
        assert on_disk["dog_002"] == "tkcap, a photo of a cat, grass" and on_disk["dog_003"] == "tkcap, a cat, snow"
        assert on_disk["dog_005"] == "tkcap"
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left
        assert page.get_by_role("dialog").count() == 0 and page.locator(".comfy-modal:visible").count() == 0
        editor.locator(".tk-close").click()  # saved: closes without asking
        sync_api.expect(editor).to_have_count(0)

        # The sidebar tab lists the input directory's folders with images; one click opens a folder.
        page.get_by_role("button", name=re.compile(r"^Captions")).first.click()
        entry = page.locator(".tunekit-caption-folders li button", has_text=folder.name)
        sync_api.expect(entry).to_contain_text(f"{UI_IMAGES} images")
        entry.click()
        sync_api.expect(counts).to_have_text(f"{UI_IMAGES}/{UI_IMAGES} images · 0 unsaved")
        sync_api.expect(cards.first.locator("textarea")).to_have_value("tkcap, a photo of a brown cat, grass, sunny")
        editor.locator(".tk-close").click()
        sync_api.expect(editor).to_have_count(0)
        own = errors.keys() - errors.remote_fetches(comfy.url)  # the frontend asking api.comfy.org about the node
        assert not [key for key in own if "tunekit" in " ".join(key).lower()], errors.report()
    print(f"editor screenshots: {tmp_path}")
