"""HTTP routes of the caption editor (web/caption_editor.js), under /tunekit/captions/.

Every folder is resolved and must lie inside ComfyUI's input directory or a configured dataset root, every
image inside that folder (symlinks resolved): anything else is answered 403. The caption logic is the core's
(trainer/captions); these handlers only parse requests, check paths and run the core off the event loop.
"""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import folder_paths
from aiohttp import web

from ..trainer.captions import add_trigger, has_tag, remove_trigger, replace_text, tag_frequency
from ..trainer.captions.sidecars import (
    CaptionsChangedOnDisk,
    PathOutsideFolder,
    checked_extension,
    folders_with_images,
    image_in_folder,
    read_folder_captions,
    write_captions,
)
from ..trainer.data.images import ImageLoadError
from ..trainer.data.thumbnails import thumbnail
from ..trainer.errors import TuneKitError
from .paths import PathNotAllowed, resolve_dataset_folder, route_roots, thumbnail_cache_directory

log = logging.getLogger("tunekit")
PREFIX = "/tunekit/captions"
MAX_PAGE = 2000
_registered = False


class BadRequest(TuneKitError):
    pass


def _text(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' is missing or not text ({value!r}): send it as a string.")
    return value


def _int(params, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(params.get(name, default))
    except (TypeError, ValueError):
        raise BadRequest(f"'{name}' is {params.get(name)!r}: send a whole number from {low} to {high}.") from None
    if not low <= value <= high:
        raise BadRequest(f"'{name}' is {value}: send a whole number from {low} to {high}.")
    return value


def _flag(params, name: str) -> bool:
    value = params.get(name, False)
    return value.lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def _captions(body: dict, name: str = "captions") -> dict[str, str]:
    captions = body.get(name)
    if not isinstance(captions, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in captions.items()):
        raise BadRequest(f"'{name}' must be an object of image name -> caption text.")
    return captions


def _folder(params) -> Path:
    """The dataset folder a request names (403 outside the route roots, 404 when it is not a folder)."""
    text = _text(params, "folder")
    if ".." in Path(text).parts:
        raise PathNotAllowed(f"Folder '{text}' contains '..': name the folder itself.")
    folder = resolve_dataset_folder(text, roots=route_roots())
    if not folder.is_dir():
        raise web.HTTPNotFound(text=f"No folder '{text}' ({folder}): check the node's folder name.")
    return folder


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("The request body is not JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _answers(handler: Callable) -> Callable:
    """TuneKit's errors as JSON answers: path refusals 403, bad input 400, unreadable images 422."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (PathNotAllowed, PathOutsideFolder) as error:
            log.warning("TuneKit caption editor refused %s: %s", request.path_qs, error)
            return web.json_response({"error": str(error)}, status=403)
        except CaptionsChangedOnDisk as error:
            return web.json_response({"error": str(error), "images": error.images}, status=409)
        except ImageLoadError as error:
            return web.json_response({"error": str(error)}, status=422)
        except TuneKitError as error:
            return web.json_response({"error": str(error)}, status=400)
    return wrapped


def _dataset_folders() -> list[dict]:
    """Folders with images in the input directory (named as the node's `folder` input takes them) and in each
    configured dataset root (absolute)."""
    input_dir = Path(folder_paths.get_input_directory()).resolve()
    found = []
    for root in route_roots():
        if not root.is_dir():
            continue
        for folder, count in folders_with_images(root):
            name = folder.relative_to(input_dir).as_posix() if root == input_dir else str(folder)
            found.append({"folder": name, "images": count})
    return found


async def list_folders(request: web.Request) -> web.Response:
    """GET: the folders the editor can open, each with its number of images."""
    return web.json_response({"folders": await asyncio.to_thread(_dataset_folders)})


async def list_captions(request: web.Request) -> web.Response:
    """GET ?folder=&extension=.txt&recursive=0&offset=0&limit=200: a page of images with their captions."""
    query = request.query
    folder, extension = _folder(query), checked_extension(query.get("extension", ".txt"))
    offset, limit = _int(query, "offset", 0, 0, 10**9), _int(query, "limit", 200, 1, MAX_PAGE)
    entries = await asyncio.to_thread(read_folder_captions, folder, extension, _flag(query, "recursive"))
    page = entries[offset:offset + limit]
    return web.json_response({
        "folder": str(folder), "extension": extension, "total": len(entries), "offset": offset,
        "items": [{"image": e.image, "caption": e.caption, "has_caption": e.has_file,
                   "version": f"{e.mtime_ns}-{e.size}", "error": e.error} for e in page],
    })


async def get_thumbnail(request: web.Request) -> web.StreamResponse:
    """GET ?folder=&image=&size=256: a cached WebP preview (the URL's `version` changes when the image does)."""
    query = request.query
    folder = _folder(query)
    image = image_in_folder(folder, _text(query, "image"))
    size = _int(query, "size", 256, 1, 4096)
    try:
        cached = await asyncio.to_thread(thumbnail, image, thumbnail_cache_directory(), size)
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return web.FileResponse(cached, headers={"Content-Type": "image/webp", "Cache-Control": "private, max-age=86400"})


async def save_captions(request: web.Request) -> web.Response:
    """POST {folder, extension, captions: {image: text}, expected?: {image: text as read}}: writes the caption
    files whose text changed; 409 (nothing written) when a file no longer holds its `expected` text."""
    body = await _json_body(request)
    folder, extension = _folder(body), checked_extension(body.get("extension", ".txt"))
    expected = _captions(body, "expected") if "expected" in body else None
    result = await asyncio.to_thread(write_captions, folder, _captions(body), extension, expected)
    if result.written:
        log.info("TuneKit caption editor wrote %d caption files in %s", len(result.written), folder)
    return web.json_response({"written": result.written, "unchanged": result.unchanged})


OPERATIONS: dict[str, Callable[[str, dict], str]] = {
    "replace": lambda caption, p: replace_text(caption, _text(p, "find"), _text(p, "replacement"),
                                               regex=_flag(p, "regex"), case_sensitive=not _flag(p, "ignore_case")),
    "add_trigger": lambda caption, p: add_trigger(caption, _text(p, "trigger"), at_end=_flag(p, "at_end")),
    "remove_trigger": lambda caption, p: remove_trigger(caption, _text(p, "trigger")),
}


async def apply_operation(request: web.Request) -> web.Response:
    """POST {operation, captions, ...its parameters}: the captions that operation changes, new text; nothing
    is written (the editor shows them as unsaved edits, to undo or save)."""
    body = await _json_body(request)
    operation = body.get("operation")
    if operation not in OPERATIONS:
        raise BadRequest(f"Operation {operation!r} is unknown: use one of {', '.join(OPERATIONS)}.")
    change = OPERATIONS[operation]
    changed = {}
    for image, caption in _captions(body).items():
        new = change(caption, body)
        if new != caption:
            changed[image] = new
    return web.json_response({"captions": changed})


async def tag_counts(request: web.Request) -> web.Response:
    """POST {captions, tag?}: every tag with the number of captions that have it; with `tag`, the images
    whose caption has that tag."""
    body = await _json_body(request)
    captions = _captions(body)
    answer: dict[str, Any] = {"tags": tag_frequency(captions.values())}
    if body.get("tag") is not None:
        tag = _text(body, "tag")
        answer["images"] = [image for image, caption in captions.items() if has_tag(caption, tag)]
    return web.json_response(answer)


def register_caption_routes() -> None:
    """Adds the routes to ComfyUI's server once; called while ComfyUI loads the extension (before its routes are
    frozen). Without a server (e.g. a script importing the nodes) there is nothing to do."""
    global _registered
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if _registered or server is None:
        return
    routes = server.routes
    routes.get(f"{PREFIX}/folders")(_answers(list_folders))
    routes.get(f"{PREFIX}/list")(_answers(list_captions))
    routes.get(f"{PREFIX}/thumbnail")(_answers(get_thumbnail))
    routes.post(f"{PREFIX}/save")(_answers(save_captions))
    routes.post(f"{PREFIX}/apply")(_answers(apply_operation))
    routes.post(f"{PREFIX}/tags")(_answers(tag_counts))
    _registered = True
