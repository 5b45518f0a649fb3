"""The built-in ``emoji`` dataset: the same emoji drawn by four vendors (npm
``emoji-datasource-<vendor>`` 16.0.0, 64x64 PNGs). Classes are emoji, domains are vendors: a
small, real cross-domain metric-learning benchmark."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

from idml.data.conversion_report import ConversionReport
from idml.data.converters import DEFAULT_VAL_FRACTION, SourceImage, convert_items

from .tools import DatasetFetchError, MissingToolError, mkdir, run

logger = logging.getLogger(__name__)

EMOJI_VENDORS = ("google", "twitter", "facebook", "apple")
EMOJI_VERSION = "16.0.0"
# Skin-tone modifiers are swatches rather than emoji; skin-tone variants are left out too.
SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})


def emoji_package(vendor: str) -> str:
    return f"emoji-datasource-{vendor}"


def emoji_tarball_name(vendor: str) -> str:
    return f"{emoji_package(vendor)}-{EMOJI_VERSION}.tgz"


def emoji_tarball_url(vendor: str) -> str:
    pkg = emoji_package(vendor)
    return f"https://registry.npmjs.org/{pkg}/-/{pkg}-{EMOJI_VERSION}.tgz"


def _emoji_help() -> str:
    cmds = "\n".join(f"  npm pack {emoji_package(v)}@{EMOJI_VERSION}" for v in EMOJI_VENDORS)
    urls = "\n".join(f"  {emoji_tarball_url(v)}" for v in EMOJI_VENDORS)
    return (
        "Get the four tarballs on a machine with npm:\n" + cmds
        + "\nor download them directly:\n" + urls
        + "\nthen put them in one folder and pass it with --tarball-dir (tarball_dir=...)."
    )


def fetch_emoji_tarballs(
    downloads: str | os.PathLike, *, tarball_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Paths of the four vendor tarballs: from ``tarball_dir``, the downloads cache, or npm."""
    if tarball_dir is not None:
        tarball_dir = Path(tarball_dir)
        tarballs = {v: tarball_dir / emoji_tarball_name(v) for v in EMOJI_VENDORS}
        missing = [str(p) for p in tarballs.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing emoji tarball(s): {', '.join(missing)}.\n{_emoji_help()}")
        return tarballs
    downloads = mkdir(Path(downloads))
    tarballs = {v: downloads / emoji_tarball_name(v) for v in EMOJI_VENDORS}
    todo = [v for v, p in tarballs.items() if not p.is_file()]
    if todo:
        npm = shutil.which("npm")
        if npm is None:
            raise MissingToolError(f"npm is not installed (not found on PATH), so the emoji dataset cannot be fetched.\n{_emoji_help()}")
        for vendor in todo:
            spec = f"{emoji_package(vendor)}@{EMOJI_VERSION}"
            logger.info("fetching %s with npm pack", spec)
            # Pack into a temp folder and rename, so a failed download never looks finished.
            with tempfile.TemporaryDirectory(dir=downloads, prefix="npm-pack-") as tmp:
                run([npm, "pack", spec, "--pack-destination", tmp], Path(tmp), f"fetching {spec}")
                packed = Path(tmp) / emoji_tarball_name(vendor)
                if not packed.is_file():
                    raise DatasetFetchError(f"npm pack {spec} did not produce {packed.name}")
                os.replace(packed, tarballs[vendor])
    return tarballs


def _read_emoji_tarball(path: Path, vendor: str) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Stream one vendor tarball: (entries of package/emoji.json, {image name: 64px PNG bytes})."""
    prefix = f"package/img/{vendor}/64/"
    entries = None
    images: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    entries = json.load(tar.extractfile(member))
                elif member.name.startswith(prefix) and "/" not in member.name[len(prefix) :]:
                    images[member.name[len(prefix) :]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read emoji tarball {path} ({e}); delete it and fetch it again") from e
    if entries is None:
        raise ValueError(f"{path} has no package/emoji.json; is it an {emoji_package(vendor)} tarball?")
    return entries, images


def _emoji_classes(data: dict, by_unified: dict, report: ConversionReport) -> list[dict]:
    """The emoji entries that become classes (drawn by every vendor, no skin-tone modifiers),
    in sort order; the others are counted in ``report``."""

    def has(vendor: str, unified: str) -> bool:
        entry = by_unified[vendor].get(unified)
        return bool(entry and entry.get(f"has_img_{vendor}") and entry.get("image") in data[vendor][1])

    kept = []
    seen_names: dict[str, str] = {}
    for entry in data[EMOJI_VENDORS[0]][0]:
        unified = entry["unified"]
        present = [v for v in EMOJI_VENDORS if has(v, unified)]
        if unified.upper() in SKIN_TONE_MODIFIERS:
            for v in present:
                report.skip("skin-tone modifier", f"{v}/{by_unified[v][unified]['image']}")
            continue
        if len(present) < len(EMOJI_VENDORS):
            for v in present:
                report.skip("emoji not drawn by all four vendors", f"{v}/{by_unified[v][unified]['image']}")
            continue
        short_name = entry["short_name"]
        if short_name in seen_names:
            raise ValueError(f"short_name {short_name!r} is used by {seen_names[short_name]} and {unified}")
        seen_names[short_name] = unified
        kept.append(entry)
    kept.sort(key=lambda e: (e.get("sort_order", 0), e["unified"]))
    return kept


def convert_emoji(
    tarballs: Mapping[str, str | os.PathLike],
    dst: str | os.PathLike,
    *,
    name: str = "emoji",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Convert the four vendor tarballs into the emoji dataset at ``dst``.

    Classes are the top-level emoji present in all four vendors (flag set and
    64px image present), without skin-tone variants or modifiers; domain = vendor,
    class_name = short_name. Sorted by sort_order, even positions go to train and
    odd ones to test; then ``val_fraction`` of the train classes moves to val.
    """
    missing = [v for v in EMOJI_VENDORS if v not in tarballs]
    if missing:
        raise ValueError(f"tarballs for vendor(s) {missing} are missing; need {list(EMOJI_VENDORS)}")
    report = ConversionReport()
    data = {v: _read_emoji_tarball(Path(tarballs[v]), v) for v in EMOJI_VENDORS}
    by_unified = {v: {e["unified"]: e for e in entries} for v, (entries, _) in data.items()}
    kept = _emoji_classes(data, by_unified, report)

    items = []
    for position, entry in enumerate(kept):
        split = "train" if position % 2 == 0 else "test"
        for vendor in EMOJI_VENDORS:
            image = by_unified[vendor][entry["unified"]]["image"]
            png = data[vendor][1][image]
            items.append(
                SourceImage(
                    id=f"{vendor}/{image}",
                    class_name=entry["short_name"],
                    domain=vendor,
                    split=split,
                    source=f"{Path(tarballs[vendor]).name}:package/img/{vendor}/64/{image}",
                    load=lambda png=png: png,
                )
            )
    return convert_items(
        items,
        dst,
        name=name,
        class_order=[e["short_name"] for e in kept],
        source={
            "converter": "emoji",
            "packages": [f"{emoji_package(v)}@{EMOJI_VERSION}" for v in EMOJI_VENDORS],
            "image_size": 64,
        },
        report=report,
        val_fraction=val_fraction,
        overwrite=overwrite,
        num_workers=num_workers,
    )


# ------------------------------------------------------------------- fashion-mnist
