"""PIL <-> Qt image conversion (copies, so neither side holds the other's buffer)."""

from __future__ import annotations

from PIL import Image
from PySide6.QtGui import QImage


def pil_to_qimage(image: Image.Image) -> QImage:
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB")
    formats = {
        "RGB": QImage.Format.Format_RGB888,
        "RGBA": QImage.Format.Format_RGBA8888,
        "L": QImage.Format.Format_Grayscale8,
    }
    data = image.tobytes()
    bytes_per_line = image.width * len(image.getbands())
    return QImage(data, image.width, image.height, bytes_per_line, formats[image.mode]).copy()


def qimage_to_pil(image: QImage) -> Image.Image:
    if image.format() == QImage.Format.Format_Grayscale8:
        mode, converted = "L", image
    else:
        mode, converted = "RGBA", image.convertToFormat(QImage.Format.Format_RGBA8888)
    width, height = converted.width(), converted.height()
    channels = 1 if mode == "L" else 4
    raw = bytes(converted.constBits())[: converted.bytesPerLine() * height]
    rows = [raw[y * converted.bytesPerLine() : y * converted.bytesPerLine() + width * channels] for y in range(height)]
    return Image.frombytes(mode, (width, height), b"".join(rows))
