"""Is this file a whole-slide image we can read, and is it whole? One module for every such check.

Used by the upload sniffer in the API (:func:`sniff`: pure Python on the first KB and the first
TIFF directory, before a byte is stored under the job's name) and by the slide reader in the
worker (:func:`vet_tiff`: every directory, through tifffile, before a decoder touches the file).
Both raise the same classes from :mod:`fprotoseg.worker.errors` (empty 400, unsupported format
415, truncated 422, decompression bomb), so a fault has one code wherever it is caught.

Accepted: TIFF and BigTIFF containers (Aperio SVS, Hamamatsu NDPI, OME-TIFF, Leica SCN, Philips
TIFF, Ventana BIF, generic tiled TIFF) and DICOM (``DICM`` after the 128-byte preamble). Refused
with a reason naming what the bytes look like: PNG, JPEG, JPEG 2000, ZIP, gzip, PDF, text,
unknown bytes. No numpy, OpenSlide or tifffile at import time: the API process imports this.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fprotoseg.worker.errors import (
    EmptySlideError,
    SlideError,
    SlideTooLargeError,
    TruncatedSlideError,
    UnsupportedFormatError,
)

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Decompression-bomb guard. The largest real slides are ~200k x 100k px; nothing real exceeds these.
MAX_SIDE_PX = 500_000
MAX_PIXELS = 100_000_000_000
# Level-0 pixels per byte of file. JPEG-compressed blank glass stays below ~100; deflate of pure
# white ~300. A header claiming far more pixels than its bytes can hold is a bomb or a truncation.
MAX_PIXELS_PER_FILE_BYTE = 1000.0

# Extensions a client may keep for the server-side name (cosmetic: readers detect by content).
TIFF_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".scn", ".bif", ".qptiff", ".btf")

_NOT_SLIDES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
    (b"\xffO\xffQ", "a JPEG 2000 codestream"),
    (b"PK\x03\x04", "a ZIP archive (upload the slide file itself; MIRAX .mrxs folders are not supported)"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x1f\x8b", "a gzip file (upload the uncompressed slide)"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"%PDF", "a PDF document"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
)

_TAG_WIDTH, _TAG_HEIGHT, _TAG_DESCRIPTION = 256, 257, 270
_TAG_STRIP_OFFSETS, _TAG_STRIP_COUNTS = 273, 279
_TAG_TILE_OFFSETS, _TAG_TILE_COUNTS = 324, 325
_TAG_NDPI = 65420
_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_TYPE_FORMATS = {3: "H", 4: "I", 16: "Q", 13: "I", 8: "h", 9: "i", 17: "q"}
_MAX_IFD_ENTRIES = 4096
_MAX_ARRAY_VALUES = 20_000_000


@dataclass(frozen=True)
class SlideFormat:
    """What the sniffer decided: a short name, the server-side file extension, a media type."""

    name: str
    extension: str
    media_type: str
    width_px: int | None = None
    height_px: int | None = None


def _unsupported(detail: str) -> UnsupportedFormatError:
    return UnsupportedFormatError(detail)


def _corrupt(detail: str) -> TruncatedSlideError:
    return TruncatedSlideError(detail)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


class _TiffReader:
    """Just enough TIFF to read the first directory's tags (classic and BigTIFF, both byte orders)."""

    def __init__(self, fh: BinaryIO, file_size: int, head: bytes) -> None:
        self.fh, self.size = fh, file_size
        self.bo = "<" if head[:2] == b"II" else ">"
        self.big = head[2:4] in (b"+\x00", b"\x00+")

    def read_at(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise _corrupt("the TIFF structure points beyond the end of the file (truncated upload?)")
        self.fh.seek(offset)
        data = self.fh.read(n)
        if len(data) != n:
            raise _corrupt("the TIFF structure points beyond the end of the file (truncated upload?)")
        return data

    def first_ifd(self) -> dict[int, tuple[int, int, bytes]]:
        """tag -> (type, count, raw value-or-offset field)."""
        bo = self.bo
        if self.big:
            offset = struct.unpack(bo + "Q", self.read_at(8, 8))[0]
            n = struct.unpack(bo + "Q", self.read_at(offset, 8))[0]
            entry_size, first = 20, offset + 8
        else:
            offset = struct.unpack(bo + "I", self.read_at(4, 4))[0]
            n = struct.unpack(bo + "H", self.read_at(offset, 2))[0]
            entry_size, first = 12, offset + 2
        if offset < 8:
            raise _corrupt("the TIFF header's first directory offset is invalid")
        if not 1 <= n <= _MAX_IFD_ENTRIES:
            raise _corrupt(f"the TIFF's first directory has {n} entries; the file is corrupt")
        raw = self.read_at(first, n * entry_size)
        tags: dict[int, tuple[int, int, bytes]] = {}
        for i in range(n):
            e = raw[i * entry_size : (i + 1) * entry_size]
            if self.big:
                tag, typ, count = struct.unpack(bo + "HHQ", e[:12])
                tags[tag] = (typ, count, e[12:20])
            else:
                tag, typ, count = struct.unpack(bo + "HHI", e[:8])
                tags[tag] = (typ, count, e[8:12])
        return tags

    def values(self, entry: tuple[int, int, bytes], limit: int = _MAX_ARRAY_VALUES) -> list[int]:
        typ, count, field = entry
        fmt = _TYPE_FORMATS.get(typ)
        if fmt is None or count > limit:
            return []
        nbytes = count * _TYPE_SIZES[typ]
        inline = 8 if self.big else 4
        if nbytes <= inline:
            data = field[:nbytes]
        else:
            off = struct.unpack(self.bo + ("Q" if self.big else "I"), field)[0]
            data = self.read_at(off, nbytes)
        return list(struct.unpack(f"{self.bo}{count}{fmt}", data))

    def ascii(self, entry: tuple[int, int, bytes], limit: int = 4096) -> str:
        typ, count, field = entry
        if typ != 2:
            return ""
        n = min(count, limit)
        inline = 8 if self.big else 4
        if count <= inline:
            data = field[:n]
        else:
            off = struct.unpack(self.bo + ("Q" if self.big else "I"), field)[0]
            data = self.read_at(off, n)
        return data.decode("latin-1", errors="replace")


def _sniff_tiff(path: Path, head: bytes, file_size: int, client_ext: str) -> SlideFormat:
    with path.open("rb") as fh:
        reader = _TiffReader(fh, file_size, head)
        tags = reader.first_ifd()
        width = (
            reader.values(tags[_TAG_WIDTH])[0]
            if _TAG_WIDTH in tags and reader.values(tags[_TAG_WIDTH])
            else None
        )
        height = (
            reader.values(tags[_TAG_HEIGHT])[0]
            if _TAG_HEIGHT in tags and reader.values(tags[_TAG_HEIGHT])
            else None
        )
        if not width or not height:
            raise _corrupt("the TIFF's first image has no width or height")
        # Level-0 pixel data must lie inside the file: a cut-off upload is refused here, not in a worker.
        for off_tag, cnt_tag in (
            (_TAG_TILE_OFFSETS, _TAG_TILE_COUNTS),
            (_TAG_STRIP_OFFSETS, _TAG_STRIP_COUNTS),
        ):
            if off_tag in tags and cnt_tag in tags:
                offsets, counts = reader.values(tags[off_tag]), reader.values(tags[cnt_tag])
                if (
                    offsets
                    and counts
                    and max(o + c for o, c in zip(offsets, counts, strict=False)) > file_size
                ):
                    raise _corrupt(
                        "the slide's image data ends beyond the end of the file (truncated upload?)"
                    )
                break
        description = reader.ascii(tags[_TAG_DESCRIPTION]) if _TAG_DESCRIPTION in tags else ""
    if _TAG_NDPI in tags:
        name, ext = "hamamatsu-ndpi", ".ndpi"
    elif description.startswith("Aperio"):
        name, ext = "aperio-svs", ".svs"
    elif "OME" in description[:1024] and "<?xml" in description[:64]:
        name, ext = "ome-tiff", ".ome.tif"
    else:
        name, ext = ("bigtiff" if reader.big else "tiff"), ".tif"
    if client_ext in TIFF_EXTENSIONS and ext == ".tif":
        ext = client_ext
    return SlideFormat(name, ext, "image/tiff", width, height)


def sniff(path: Path, client_filename: str | None = None) -> SlideFormat:
    """Decide the format of the uploaded file at ``path`` from its first KB and first TIFF directory.

    Raises EmptySlideError (400), UnsupportedFormatError (415) or TruncatedSlideError (422).
    """
    file_size = path.stat().st_size
    if file_size == 0:
        raise EmptySlideError("the uploaded file is empty")
    with path.open("rb") as fh:
        head = fh.read(4096)
    client_ext = Path(client_filename or "").suffix.lower()
    if head[:4] in TIFF_MAGICS:
        if file_size < 16:
            raise _corrupt("the file has a TIFF header but nothing else (truncated upload?)")
        return _sniff_tiff(path, head, file_size, client_ext)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return SlideFormat("dicom", ".dcm", "application/dicom")
    for magic, what in _NOT_SLIDES:
        if head.startswith(magic):
            raise _unsupported(f"the upload is {what}, not a whole-slide image")
    if _looks_like_text(head):
        raise _unsupported("the upload is a text file, not a whole-slide image")
    raise _unsupported(
        "the upload is not a whole-slide image format fprotoseg reads (TIFF-based: SVS, NDPI, "
        "OME-TIFF, SCN, BIF, Philips TIFF, pyramidal TIFF; or DICOM)"
    )


# ------------------------------------------------ the reader's check of every directory (tifffile)
class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """tifffile logs malformed headers (and carries on); we collect them instead of printing,
    and report what matters as one SlideError line. Python warnings from readers are muted too."""
    logger = logging.getLogger("tifffile")
    collect = _Collect()
    previous = logger.propagate
    logger.addHandler(collect)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield collect.messages
    finally:
        logger.removeHandler(collect)
        logger.propagate = previous


def vet_tiff(path: Path, file_size: int) -> bool:
    """Check claimed TIFF dimensions and tile offsets before any decoder touches the file.

    Returns whether the file is an OME-TIFF (its pyramid lives in SubIFDs, which only tiffslide
    reads; OpenSlide's generic-tiff driver would see level 0 alone).
    """
    import tifffile

    try:
        with quiet_tifffile() as complaints, tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if any("offset" in c for c in complaints):
                raise TruncatedSlideError(
                    f"{path.name} is truncated or corrupt (an image directory points past its "
                    f"{file_size} bytes); upload the complete file"
                )
            if not pages:
                raise TruncatedSlideError(
                    f"{path.name} is truncated or not a complete TIFF (no image directory inside "
                    f"its {file_size} bytes); upload the complete file"
                )
            widest = max(pages, key=lambda p: int(p.imagewidth) * int(p.imagelength))
            check_dimensions(path, int(widest.imagewidth), int(widest.imagelength), file_size)
            for page in pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets) and len(counts) == len(offsets):
                    end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=True))
                    if end > file_size:
                        raise TruncatedSlideError(
                            f"{path.name} is truncated: image data runs to byte {end} but the file "
                            f"has {file_size} bytes; upload the complete file"
                        )
            return bool(tif.is_ome)
    except SlideError:
        raise
    except Exception as exc:  # tifffile raises many types on malformed headers
        raise SlideError(f"{path.name} is not a readable TIFF/whole-slide image: {one_line(exc)}") from exc


def check_dimensions(path: Path, width_px: int, height_px: int, file_size: int) -> None:
    if width_px <= 0 or height_px <= 0:
        raise SlideError(f"{path.name} claims an empty image ({width_px}x{height_px} px)")
    pixels = width_px * height_px
    if max(width_px, height_px) > MAX_SIDE_PX or pixels > MAX_PIXELS:
        raise SlideTooLargeError(
            f"{path.name} claims {width_px}x{height_px} px, beyond any real slide "
            f"(limits: side {MAX_SIDE_PX} px, {MAX_PIXELS:.0e} px); refusing to read it"
        )
    if file_size > 0 and pixels / file_size > MAX_PIXELS_PER_FILE_BYTE:
        raise SlideTooLargeError(
            f"{path.name} claims {width_px}x{height_px} px but holds only {file_size} bytes "
            f"(a decompression bomb or a truncated file); refusing to read it"
        )


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
