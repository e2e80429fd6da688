"""Training photos from Debian's wallpaper packages, for the real-world superres model (issue 33).

The wheel-shipped corpus (:mod:`difftool.training.data`) is 17 images, most of them grey textures; the
real-world model learns JPEG's colour artefacts (4:2:0 chroma) from colour photos. These come from the
Debian archive, a package registry this workplace reaches: ``apt-get download`` fetches the pinned
package versions, ``dpkg-deb -x`` unpacks them, and each photo listed in :data:`PHOTOS` (cameras' JPEGs,
3-6k pixels wide) is downscaled with Lanczos to :data:`LONG_SIDE` pixels, which removes the camera's own
noise and JPEG artefacts: clean high-resolution targets. Illustrations in the same packages are left out.

``mate-backgrounds`` is reserved for evaluation: it is refused here whatever is asked.

    python -m difftool.training.debian_photos runs/debian-photos
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

#: Debian 12 packages and the versions the shipped weights were trained from.
PACKAGES: dict[str, str] = {"lomiri-wallpapers-16.04": "20.04.0-2", "lomiri-wallpapers-20.04": "20.04.0-2"}
#: Packages that hold evaluation images: never training data.
RESERVED: tuple[str, ...] = ("mate-backgrounds",)
#: file name -> (package, author, licence), from each package's debian/copyright.
PHOTOS: dict[str, tuple[str, str, str]] = {
    "aitzgorri_by_Aitzol_Berasategi.jpg": ("lomiri-wallpapers-16.04", "Aitzol Berasategi", "CC-BY-4.0"),
    "friends_by_Aitzol_Berasategi.jpg": ("lomiri-wallpapers-16.04", "Aitzol Berasategi", "CC-BY-4.0"),
    "life_by_Aitzol_Berasategi.jpg": ("lomiri-wallpapers-16.04", "Aitzol Berasategi", "CC-BY-4.0"),
    "picosdeeuropa_by_Aitzol_Berasategi.jpg": ("lomiri-wallpapers-16.04", "Aitzol Berasategi", "CC-BY-4.0"),
    "sunset_by_Aitzol_Berasategi.jpg": ("lomiri-wallpapers-16.04", "Aitzol Berasategi", "CC-BY-4.0"),
    "Picture_0B_by_freespace.jpg": ("lomiri-wallpapers-16.04", 'Trevor "Freespace"', "CC-BY-4.0"),
    "Picture_1A_by_freespace.jpg": ("lomiri-wallpapers-16.04", 'Trevor "Freespace"', "CC-BY-4.0"),
    "Wine_by_Jakkub_Mede.jpg": ("lomiri-wallpapers-16.04", "Jakub Mede", "CC-BY-4.0"),
    "seeding_by_Clements_Engelhardt.jpg": ("lomiri-wallpapers-16.04", "Clemens Engelhardt", "CC0-1.0"),
    "Bridge_by_Sander_Klootwijk.jpg": ("lomiri-wallpapers-16.04", "Sander Klootwijk", "CC-BY-SA-4.0"),
    "Dragonfly_by_Bolly.jpg": ("lomiri-wallpapers-16.04", '"Bolly"', "CC-BY-SA-4.0"),
    "free_by_Peter_Nerlich.jpg": ("lomiri-wallpapers-16.04", "Peter Nerlich", "CC-BY-SA-4.0"),
    "greentock_by_Peter_Nerlich.jpg": ("lomiri-wallpapers-16.04", "Peter Nerlich", "CC-BY-SA-4.0"),
    "Infinite-Sea_by_Aury88.jpg": ("lomiri-wallpapers-20.04", "Aury88", "CC-BY-SA-3.0"),
    "Kleiber_by_Lukas_Baubkus.jpg": ("lomiri-wallpapers-20.04", "Lukas Baubkus", "CC-BY-SA-3.0"),
}
#: Long side of the prepared photos, in pixels.
LONG_SIDE = 1536


def fetch(packages: dict[str, str], into: Path) -> dict[str, Path]:
    """``apt-get download`` each pinned package into ``into``; returns package -> unpacked root."""
    reserved = sorted(set(packages) & set(RESERVED))
    if reserved:
        raise ValueError(f"{', '.join(reserved)} is reserved for evaluation; never train on it")
    roots = {}
    for package, version in packages.items():
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=into, check=True)
        (deb,) = into.glob(f"{package}_*.deb")
        root = into / package
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[package] = root
    return roots


def prepare(out: Path, debs: Path | None = None, long_side: int = LONG_SIDE) -> list[Path]:
    """Write each photo of :data:`PHOTOS` as a PNG at most ``long_side`` pixels long into ``out``.

    ``debs``: a folder with the packages already unpacked (``PACKAGE/usr/share/backgrounds/...``);
    otherwise they are downloaded into a temporary folder.
    """
    from PIL import Image

    from difftool.core.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        roots = {p: Path(debs) / p for p in PACKAGES} if debs else fetch(PACKAGES, Path(scratch))
        for name, (package, _author, _licence) in PHOTOS.items():
            found = sorted(roots[package].rglob(name))
            if len(found) != 1:
                raise FileNotFoundError(f"{name} is not in {package} {PACKAGES[package]} (found {len(found)})")
            source = found[0]
            with Image.open(source) as image:
                rgb = image.convert("RGB")
            factor = min(1.0, long_side / max(rgb.size))
            size = (round(rgb.width * factor), round(rgb.height * factor))
            small = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            target = out / (Path(name).stem + ".png")
            buffer = io.BytesIO()
            small.save(buffer, "PNG")
            atomic_write_bytes(target, buffer.getvalue())
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m difftool.training.debian_photos OUT_FOLDER [UNPACKED_DEBS]")
    written = prepare(Path(args[0]), Path(args[1]) if len(args) > 1 else None)
    print(f"{len(written)} photos in {args[0]}")


if __name__ == "__main__":
    main()
