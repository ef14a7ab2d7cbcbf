"""The caption editor's routes on a real ComfyUI server, over HTTP: listing, thumbnails, bulk operations, tag
counts and saving; every path kept inside the input directory (403 otherwise). The editor itself in a
browser: test_caption_editor_ui.py."""
import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from PIL import Image

from .conftest import DATASET_ROOT

ROUTES = "/tunekit/captions"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
REPO = Path(__file__).resolve().parents[2]


def _request(comfy, path: str, body=None) -> tuple[int, bytes, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(comfy.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(request, timeout=60) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def _json(comfy, path: str, body=None, status: int = 200) -> dict:
    code, data, _ = _request(comfy, path, body)
    assert code == status, (code, data[:500])
    return json.loads(data)


def _get(route: str, **query) -> str:
    return f"{ROUTES}/{route}?{urlencode(query)}"


def make_dataset(folder: Path, count: int, captions: dict[int, str] | None = None, size=(64, 48)) -> list[str]:
    """`count` small PNGs named img_0000.png...; each gets `captions[i]` (default 'a photo of a dog, grass')
    except where that is None (no caption file)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img_{index:04d}.png"
        Image.new("RGB", size, ((index * 37) % 256, (index * 91) % 256, 120)).save(folder / name)
        caption = (captions or {}).get(index, "a photo of a dog, grass")
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def dataset(comfy) -> Path:
    folder = comfy.input_dir / "tk_captions_routes"
    make_dataset(folder, 5, {0: "sks, dog, red collar, grass", 1: "a dog on grass", 2: "dog, snow", 3: None})
    return folder


@pytest.fixture(scope="module")
def outside(comfy) -> Path:
    """A folder with an image outside every route root, and symlinks into it from the input directory."""
    folder = comfy.workdir / "not_a_dataset_root"
    make_dataset(folder, 1, {0: "secret"})
    links = comfy.input_dir / "tk_captions_links"
    links.mkdir(exist_ok=True)
    for link, target in ((comfy.input_dir / "tk_link_out", folder), (links / "escape.png", folder / "img_0000.png")):
        if not link.is_symlink():
            link.symlink_to(target)
    Image.new("RGB", (8, 8)).save(links / "inside.png")
    return folder


def test_list_pages_captions_of_a_folder(comfy, dataset):
    first = _json(comfy, _get("list", folder=dataset.name, limit=2))
    assert first["total"] == 5 and first["offset"] == 0 and first["folder"] == str(dataset.resolve())
    assert [i["image"] for i in first["items"]] == ["img_0000.png", "img_0001.png"]
    assert first["items"][0]["caption"] == "sks, dog, red collar, grass" and first["items"][0]["has_caption"]
    rest = _json(comfy, _get("list", folder=dataset.name, offset=2, limit=10))
    assert [i["image"] for i in rest["items"]] == ["img_0002.png", "img_0003.png", "img_0004.png"]
    assert rest["items"][1] == {**rest["items"][1], "caption": "", "has_caption": False}
    # Bad parameters are named; a folder that does not exist is a 404.
    assert "limit" in _json(comfy, _get("list", folder=dataset.name, limit="many"), status=400)["error"]
    assert "extension" in _json(comfy, _get("list", folder=dataset.name, extension=".png"), status=400)["error"].lower()
    assert _request(comfy, _get("list", folder="tk_no_such_folder"))[0] == 404


def test_paths_outside_the_input_directory_are_refused(comfy, dataset, outside):
    refused_folders = [
        "..", "../input/" + dataset.name, f"{dataset.name}/../{dataset.name}",  # '..' anywhere
        str(outside), str(comfy.output_dir), "/etc",  # absolute paths outside (output/ is a node root, not a route root)
        "tk_link_out",  # a symlink in input/ that leads outside
    ]
    for folder in refused_folders:
        for path, body in ((_get("list", folder=folder), None),
                           (_get("thumbnail", folder=folder, image="img_0000.png"), None),
                           (f"{ROUTES}/save", {"folder": folder, "captions": {"img_0000.png": "pwned"}})):
            code, data, _ = _request(comfy, path, body)
            assert code == 403, (folder, path, code, data[:300])
    refused_images = ["../tk_link_out/img_0000.png", "/etc/hostname", str(outside / "img_0000.png"), "escape.png"]
    for image in refused_images:
        links = "tk_captions_links"
        assert _request(comfy, _get("thumbnail", folder=links, image=image))[0] == 403, image
        assert _request(comfy, f"{ROUTES}/save", {"folder": links, "captions": {image: "pwned"}})[0] == 403, image
    # The symlinked image is left out of the listing; the real one inside is listed and served.
    listed = _json(comfy, _get("list", folder="tk_captions_links"))
    assert [i["image"] for i in listed["items"]] == ["inside.png"]
    assert _request(comfy, _get("thumbnail", folder="tk_captions_links", image="inside.png"))[0] == 200
    assert (outside / "img_0000.txt").read_text() == "secret"
    assert not (comfy.output_dir / "img_0000.txt").exists()  # the refused save into output/ wrote nothing


def test_a_configured_dataset_root_is_reachable_and_its_neighbours_are_not(comfy, outside):
    root = comfy.workdir / DATASET_ROOT
    make_dataset(root / "set_a", 2)
    listed = _json(comfy, _get("list", folder=str(root / "set_a")))
    assert listed["total"] == 2 and listed["folder"] == str((root / "set_a").resolve())
    assert {"folder": str(root / "set_a"), "images": 2} in _json(comfy, f"{ROUTES}/folders")["folders"]
    assert _request(comfy, _get("list", folder=str(root) + "_not"))[0] == 403  # a prefix is not a parent
    assert _request(comfy, _get("list", folder=str(outside)))[0] == 403


def test_folders_lists_what_the_editor_may_open(comfy, dataset, outside):
    folders = {f["folder"]: f["images"] for f in _json(comfy, f"{ROUTES}/folders")["folders"]}
    assert folders[dataset.name] == 5 and folders["tk_captions_links"] == 1, folders  # escape.png leads out
    assert "tk_link_out" not in folders and not [f for f in folders if str(outside) in f], folders


def test_thumbnails_are_made_once_and_cached(comfy):
    # An image larger than the size asked, so that the preview is scaled down. The cache is the server's,
    # shared with every other test's thumbnails (the editor's browser test makes 192x144 ones of size 256):
    # only the file this request made is looked at.
    folder = comfy.input_dir / "tk_captions_thumbs"
    make_dataset(folder, 1, size=(300, 200))
    cache = comfy.user_dir / "tunekit" / "cache" / "thumbnails"
    before = set(cache.rglob("*.webp"))
    path = _get("thumbnail", folder=folder.name, image="img_0000.png", size=128)
    code, data, kind = _request(comfy, path)
    assert code == 200 and kind == "image/webp", (code, kind)
    made = {p: p.stat().st_mtime_ns for p in set(cache.rglob("*.webp")) - before}
    assert len(made) == 1 and next(iter(made)).read_bytes() == data, made
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (128, 85), thumb.size  # 128 on the long side, the aspect kept
    assert _request(comfy, path)[1] == data  # served again from the cache, not remade
    assert {p: p.stat().st_mtime_ns for p in set(cache.rglob("*.webp")) - before} == made
    assert "size" in _json(comfy, _get("thumbnail", folder=folder.name, image="img_0000.png", size=100), status=400)["error"]
    assert _request(comfy, _get("thumbnail", folder=folder.name, image="img_0000.txt"))[0] == 400


def test_bulk_operations_and_tag_counts_change_nothing_on_disk(comfy, dataset):
    before = {p.name: p.read_text() for p in dataset.glob("*.txt")}
    captions = {i["image"]: i["caption"] for i in _json(comfy, _get("list", folder=dataset.name))["items"]}
    apply = f"{ROUTES}/apply"
    replaced = _json(comfy, apply, {"operation": "replace", "find": "dog", "replacement": "cat", "captions": captions})
    assert replaced["captions"] == {"img_0000.png": "sks, cat, red collar, grass", "img_0001.png": "a cat on grass",
                                    "img_0002.png": "cat, snow", "img_0004.png": "a photo of a cat, grass"}
    regex = _json(comfy, apply, {"operation": "replace", "find": r"\b(\w+) on (\w+)", "replacement": r"\2 under \1",
                                 "regex": True, "captions": captions})
    assert regex["captions"] == {"img_0001.png": "a grass under dog"}
    bad = _json(comfy, apply, {"operation": "replace", "find": "(", "replacement": "", "regex": True,
                               "captions": captions}, status=400)
    assert "regular expression" in bad["error"]
    added = _json(comfy, apply, {"operation": "add_trigger", "trigger": "sks", "captions": captions})["captions"]
    assert "img_0000.png" not in added and added["img_0003.png"] == "sks" and added["img_0002.png"] == "sks, dog, snow"
    removed = _json(comfy, apply, {"operation": "remove_trigger", "trigger": "sks", "captions": captions})
    assert removed["captions"] == {"img_0000.png": "dog, red collar, grass"}
    assert "unknown" in _json(comfy, apply, {"operation": "rm -rf", "captions": captions}, status=400)["error"]

    tags = _json(comfy, f"{ROUTES}/tags", {"captions": captions, "tag": "Grass"})
    assert tags["tags"][:3] == [["dog", 2], ["grass", 2], ["a dog on grass", 1]], tags["tags"]
    assert tags["images"] == ["img_0000.png", "img_0004.png"]  # whole tags: "a dog on grass" has no tag 'grass'
    assert {p.name: p.read_text() for p in dataset.glob("*.txt")} == before


def test_save_writes_only_changed_captions_atomically(comfy, dataset):
    save = f"{ROUTES}/save"
    stamp = (dataset / "img_0002.txt").stat().st_mtime_ns
    answer = _json(comfy, save, {"folder": dataset.name, "captions": {
        "img_0000.png": "sks dog, blue collar", "img_0002.png": "dog, snow", "img_0003.png": "a new caption"}})
    assert answer == {"written": ["img_0000.png", "img_0003.png"], "unchanged": ["img_0002.png"]}
    assert (dataset / "img_0000.txt").read_text(encoding="utf-8") == "sks dog, blue collar"
    assert (dataset / "img_0003.txt").read_text(encoding="utf-8") == "a new caption"
    assert (dataset / "img_0002.txt").stat().st_mtime_ns == stamp
    # One bad name and nothing is written; no temp files are left behind.
    code, _, _ = _request(comfy, save, {"folder": dataset.name, "captions": {
        "img_0001.png": "changed", "missing.png": "x"}})
    assert code == 400 and (dataset / "img_0001.txt").read_text() == "a dog on grass"
    assert sorted(p.name for p in dataset.iterdir() if p.name.startswith(".")) == []
    # A file changed on disk since the editor read it is not overwritten: 409, nothing written.
    (dataset / "img_0001.txt").write_text("edited elsewhere", encoding="utf-8")
    stale = _json(comfy, save, {"folder": dataset.name, "captions": {"img_0001.png": "mine", "img_0002.png": "dog"},
                                "expected": {"img_0001.png": "a dog on grass", "img_0002.png": "dog, snow"}}, status=409)
    assert stale["images"] == ["img_0001.png"] and "changed on disk" in stale["error"]
    assert (dataset / "img_0001.txt").read_text() == "edited elsewhere" and (dataset / "img_0002.txt").read_text() == "dog, snow"
    # A caption extension of the node (.caption) writes beside the image with that extension.
    _json(comfy, save, {"folder": dataset.name, "extension": "caption", "captions": {"img_0004.png": "other"}})
    assert (dataset / "img_0004.caption").read_text() == "other" and (dataset / "img_0004.txt").exists()
