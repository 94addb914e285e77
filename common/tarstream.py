"""A lean, strict reader of tar streams (ustar, pax and GNU headers), the one both services parse uploads with.

tarfile parses each header through a dozen general-purpose helpers (about 30 µs apiece); a workspace
arrives as thousands of small files, so this reads just the fields extraction needs with plain
slicing, and hands file content over as views of the inflated buffer, without copies.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol
from zlib import adler32

from common.errors import ArchiveRefused, ArchiveTooLarge

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Largest pax or GNU long-name header accepted; real ones are a few hundred bytes.
MAX_EXTENDED_HEADER = 1024 * 1024
# Modification times beyond this (about year 33,000) are refused: no filesystem stores them, and the
# system calls that set them overflow (a base-256 field or a pax record can hold any number).
MAX_MTIME = 1 << 40
# Typeflags whose header is followed by `size` bytes of content (regular, old regular, contiguous).
REGULAR_TYPES = (b"0", b"\0", b"7")
_POSIX_MAGIC = b"ustar\x0000"
_SIGNED_BYTES = struct.Struct("148b8x356b")


class TarSource(Protocol):
    """Where the tar bytes come from (the inflated upload)."""

    def read_exact(self, size: int) -> bytes | None:
        """Exactly `size` bytes; None if the data ends first (a partial read raises ArchiveRefused)."""

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next `size` bytes as views; raises ArchiveRefused if the data ends first."""

    def remainder(self) -> Iterator[memoryview]:
        """Everything left, as views."""


@dataclass(slots=True)
class TarMember:
    name: str
    type: bytes  # the one-byte typeflag
    mode: int
    size: int
    mtime: float
    linkname: str
    sparse: bool


class TarReader:
    """Iterates the members of a tar stream; a regular member's content is read with `content()`
    before asking for the next member (unread content is skipped)."""

    def __init__(self, source: TarSource) -> None:
        self._source = source
        self._offset = 0  # of the next header, in the tar data
        self._unread = 0  # content and padding of the current member not yet consumed
        self._global_pax: dict[str, str] = {}

    def __iter__(self) -> Iterator[TarMember]:
        while (member := self._next()) is not None:
            yield member

    def content(self, member: TarMember) -> Iterator[memoryview]:
        """The member's content, in pieces; the views are valid until the next piece is requested."""
        yield from self._source.pieces(member.size)
        self._unread -= member.size

    def _next(self) -> TarMember | None:
        if self._unread:
            for _ in self._source.pieces(self._unread):
                pass
        pax: dict[str, str] = {}
        long_name = long_link = None
        typeflag: bytes  # set by the loop, which ends only by `break` once a member's own header is read
        while True:
            header_offset = self._offset
            block = self._source.read_exact(BLOCK)
            if block is None:
                if header_offset == 0:
                    raise ArchiveRefused("archive holds no tar data")
                return None  # the data ends at a header boundary without an end marker: accepted, as tar does
            if block == ZERO_BLOCK:
                self._expect_only_padding(header_offset)
                return None
            _verify_checksum(block, header_offset)
            typeflag = block[156:157]
            size = _number(block[124:136], header_offset)
            if typeflag in (b"x", b"g", b"L", b"K"):
                data = self._extended_header(size, header_offset)
                if typeflag == b"x":
                    pax.update(_pax_records(data, header_offset))
                elif typeflag == b"g":
                    self._global_pax.update(_pax_records(data, header_offset))
                elif typeflag == b"L":
                    long_name = _text(data.split(b"\0", 1)[0])
                else:
                    long_link = _text(data.split(b"\0", 1)[0])
                continue
            break

        name = long_name if long_name is not None else _text(block[:100].split(b"\0", 1)[0])
        if long_name is None and block[257:265] == _POSIX_MAGIC and block[345] != 0:
            name = _text(block[345:500].split(b"\0", 1)[0]) + "/" + name
        linkname = long_link if long_link is not None else _text(block[157:257].split(b"\0", 1)[0])
        mtime: float = _number(block[136:148], header_offset)
        if self._global_pax or pax:
            records = {**self._global_pax, **pax}
            name = records.get("path", name)
            linkname = records.get("linkpath", linkname)
            try:
                if not records.get("size", "0").isdecimal():
                    raise ValueError  # int() would also take "+1", " 1" or "1_0"
                size = int(records.get("size", size))
                mtime = float(records.get("mtime", mtime))
                if size < 0 or not math.isfinite(mtime):
                    raise ValueError
            except ValueError:
                raise ArchiveRefused(f"archive is corrupt: bad size or mtime in the pax header of {name!r}") from None
        if not -MAX_MTIME <= mtime <= MAX_MTIME:
            raise ArchiveRefused(f"archive member {name!r} has a modification time out of range ({mtime:.0f} seconds)")
        if typeflag == b"\0" and name.endswith("/"):
            typeflag = b"5"  # a pre-POSIX directory
        sparse = typeflag == b"S" or any(key.startswith("GNU.sparse.") for key in pax)
        has_content = typeflag in REGULAR_TYPES or sparse
        self._unread = _padded(size) if has_content else 0
        self._offset = header_offset + BLOCK + self._unread
        return TarMember(
            name=name,
            type=typeflag,
            mode=_number(block[100:108], header_offset) & 0o7777,
            size=size if has_content else 0,
            mtime=mtime,
            linkname=linkname,
            sparse=sparse,
        )

    def _extended_header(self, size: int, header_offset: int) -> bytes:
        if size > MAX_EXTENDED_HEADER:
            raise ArchiveTooLarge(
                f"archive has a {size}-byte extended header at offset {header_offset}; "
                f"at most {MAX_EXTENDED_HEADER} bytes are accepted"
            )
        data = self._source.read_exact(_padded(size))
        if data is None:
            raise ArchiveRefused("archive is truncated: the tar data ends after an extended header")
        self._offset = header_offset + BLOCK + len(data)
        return data[:size]

    def _expect_only_padding(self, end_offset: int) -> None:
        # Only zeros may follow the end marker: anything else means the "end" was a damaged header.
        for piece in self._source.remainder():
            if piece.tobytes().strip(b"\0"):
                raise ArchiveRefused(
                    f"archive is corrupt: an empty header at offset {end_offset} of the tar data is followed by more data"
                )


def _verify_checksum(block: bytes, offset: int) -> None:
    stored = _number(block[148:156], offset)
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 0x20
    # Some old tars summed signed bytes; accept either, as tar does.
    if stored != unsigned and stored != sum(_SIGNED_BYTES.unpack(block)) + 8 * 0x20:
        raise ArchiveRefused(f"archive is corrupt: the header at offset {offset} of the tar data has a bad checksum")


def _byte_sum(block: bytes) -> int:
    # sum() walks the block one Python int at a time (2 µs, twice per member with pax headers);
    # adler32's low half is 1 + the byte sum mod 65521, exact for 256 bytes (at most 65,280).
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _number(field: bytes, offset: int) -> int:
    if field[0] & 0x80:
        # GNU base-256, for sizes and times that do not fit in octal.
        if field[0] == 0xFF:
            raise ArchiveRefused(f"archive is corrupt: negative number in the header at offset {offset}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ArchiveRefused(
            f"archive is corrupt: the header at offset {offset} of the tar data is not a tar header"
        ) from None


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records (POSIX pax extended header)."""
    records: dict[str, str] = {}
    position = 0
    try:
        while position < len(data) and data[position] != 0:
            space = data.index(b" ", position)
            digits = data[position:space]
            # Only ASCII digits (int() would take "+1", " 1" or "1_0"), and the record must end
            # within the header: a length running past it is a damaged or forged header.
            if not digits.isdigit() or not digits.isascii():
                raise ValueError
            length = int(digits)
            if length <= space - position + 1 or position + length > len(data):
                raise ValueError
            record = data[space + 1 : position + length]
            key, equals, value = record[:-1].partition(b"=")
            if not record.endswith(b"\n") or not equals or not key:
                raise ValueError
            records[_text(key)] = _text(value)
            position += length
    except ValueError:
        raise ArchiveRefused(f"archive is corrupt: bad pax header at offset {offset} of the tar data") from None
    return records


def _text(raw: bytes) -> str:
    # Undecodable bytes survive as surrogates and become the same bytes again in os calls.
    return raw.decode("utf-8", "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK
