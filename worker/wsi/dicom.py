"""DICOM WSI as a folder of instances: which file the reader opens, how a folder is hashed, and how
an uploaded zip of one series is unpacked safely. Stdlib only: the API imports it.

Why: OpenSlide 4 reads a DICOM WSI from any one instance of the series and finds the other
instances in the same folder, so a series travels as a folder (by reference) or as a zip (upload).
A zip is hostile input: its entry names may climb out (``../``, absolute paths, drive letters),
its sizes may lie and it may be a decompression bomb. Unpacking here never uses an entry's name
as a path (each file gets a server-chosen name in a fresh folder), refuses the names anyway with a
clear error (a lab should learn its zip is malformed), caps the number of files and the bytes
actually written (counted while inflating, not taken from the headers), and on any refusal
removes everything it wrote.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from fprotoseg.model.digest import file_sha256_and_size
from fprotoseg.worker.errors import DicomSeriesError, UnsafeZipError, UnsupportedFormatError, ZipTooLargeError

DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
DICOM_FOLDER_SUFFIX = ".dicom"  # the stored folder of an unpacked series: <job id>.dicom/
ZIP_MAGIC = b"PK\x03\x04"
MAX_COMPRESSION_RATIO = 200  # DICOM WSI (JPEG/J2K tiles) barely compresses; a bomb does 1000x
COPY_CHUNK_BYTES = 1 << 20
MAX_SERIES_FILES = 100_000  # instances of a folder named on the command line (the API has its own cap)


def is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == DICOM_MAGIC


def is_zip_file(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(4) == ZIP_MAGIC


def series_files(folder: Path, max_files: int) -> list[Path]:
    """The DICOM instances directly in ``folder`` (sorted by name); other files are ignored.

    Raises UnsupportedFormatError when there is none, DicomSeriesError beyond ``max_files``.
    """
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            continue
        if is_dicom_file(entry):
            found.append(entry)
            if len(found) > max_files:
                raise DicomSeriesError(f"the DICOM folder holds more than {max_files} instances")
    if not found:
        raise UnsupportedFormatError("the folder holds no DICOM file (DICM after the 128-byte preamble)")
    return found


def series_entry(folder: Path, max_files: int = MAX_SERIES_FILES) -> Path:
    """The instance the reader opens (OpenSlide finds the rest of the series beside it)."""
    return series_files(folder, max_files)[0]


def folder_sha256(files: list[Path], folder: Path) -> tuple[str, int]:
    """(sha256, total bytes) of a series: sha256 over ``"<sha256 of file>  <name>\\n"`` lines in name
    order (what ``sha256sum * | sha256sum`` prints), so the same instances hash the same anywhere."""
    lines, total = [], 0
    for path in files:
        sha256, size = file_sha256_and_size(path)
        total += size
        lines.append(f"{sha256}  {path.relative_to(folder).as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), total


def _check_name(name: str) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
        raise UnsafeZipError(f"the zip has an entry that points outside its folder: {name[:120]!r}")
    if "\x00" in name:
        raise UnsafeZipError("the zip has an entry name with a NUL byte")


def unpack_series_zip(zip_path: Path, dest: Path, *, max_files: int, max_bytes: int) -> list[Path]:
    """Unpack the DICOM instances of ``zip_path`` into the new folder ``dest`` (server-chosen names).

    Refuses (and leaves nothing): entry names with ``..``/absolute/drive paths, symlink entries,
    more than ``max_files`` entries, more than ``max_bytes`` inflated in total or an entry inflating
    beyond ``MAX_COMPRESSION_RATIO`` (a bomb), a corrupt zip, and a zip with no DICOM file.
    """
    dest.mkdir(mode=0o700)
    try:
        try:
            archive = zipfile.ZipFile(zip_path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UnsafeZipError(f"the upload is not a readable zip ({type(exc).__name__})") from None
        with archive:
            entries = archive.infolist()
            if len(entries) > max_files:
                raise ZipTooLargeError(
                    f"the zip has {len(entries)} entries; at most {max_files} are accepted"
                )
            for info in entries:  # every name is checked before a byte is written
                _check_name(info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise UnsafeZipError(f"the zip has a symbolic link entry: {info.filename[:120]!r}")
            written_total = 0
            files: list[Path] = []
            for index, info in enumerate(e for e in entries if not e.is_dir()):
                target = dest / f"{index:06d}.dcm"
                entry_cap = max(info.compress_size, 1) * MAX_COMPRESSION_RATIO + 1024
                written = 0
                with archive.open(info) as src, target.open("wb") as out:
                    while chunk := src.read(COPY_CHUNK_BYTES):
                        written += len(chunk)
                        written_total += len(chunk)
                        if written_total > max_bytes:
                            raise ZipTooLargeError(
                                f"the zip inflates to more than {max_bytes / 2**20:g} MiB "
                                "(FPROTOSEG_DICOM_ZIP_MAX_MB)"
                            )
                        if written > entry_cap:
                            raise ZipTooLargeError(
                                f"a zip entry inflates more than {MAX_COMPRESSION_RATIO}x (a zip bomb?)"
                            )
                        out.write(chunk)
                if is_dicom_file(target):
                    files.append(target)
                else:  # README, DICOMDIR, __MACOSX junk: not part of the series
                    target.unlink()
        if not files:
            raise UnsupportedFormatError("the zip holds no DICOM file; send a zip of one DICOM WSI series")
        return files
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # corrupt data inside a readable zip
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeZipError(f"the zip is corrupt ({type(exc).__name__})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
