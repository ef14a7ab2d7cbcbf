"""Latents encoded once and kept: in memory for the run, and on disk across runs when given a folder.

An entry's key is a hash of the image's content, its bucket, resize and crop (flip included), the resize
filter and the VAE's identity: change any of them and the old entry is simply never asked for again.
"""

import hashlib
import json
import logging
from pathlib import Path

import safetensors.torch
import torch

from ..files import atomic_write

log = logging.getLogger(__name__)
FORMAT = 1  # bump when what a latent means changes (e.g. the encoding of pixels)


def latent_key(digest: str, bucket, resized, crop, interpolation: str | None, vae_identity: str) -> str:
    parts = [FORMAT, digest, list(bucket), list(resized), [crop.top, crop.left, crop.flip], interpolation, vae_identity]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class LatentCache:
    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        latent = self._read(key)
        if latent is not None:
            self.memory[key] = latent
            self.hits += 1
        else:
            self.misses += 1
        return latent

    def put(self, key: str, latent: torch.Tensor) -> None:
        latent = latent.detach().float().cpu().contiguous()
        self.memory[key] = latent
        if self.folder is not None:
            path = self._path(key)
            try:
                atomic_write(path, lambda temp: safetensors.torch.save_file({"latent": latent}, str(temp)))
            except OSError as error:
                log.warning("TuneKit cannot write the latent cache %s: %s", path, error)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return safetensors.torch.load_file(str(path))["latent"]
        except Exception as error:  # a torn or foreign file: encode again
            log.warning("TuneKit ignores an unreadable cached latent %s: %s", path, error)
            return None
