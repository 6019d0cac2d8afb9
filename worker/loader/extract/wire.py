"""Protobuf's wire format, read exactly as upb (the parser behind
``ParseFromString``) reads it, so a walk over the bytes and a whole-message
parse agree on every input (ARCHITECTURE.md, "Decoding"):

- a tag is a varint of at most 5 bytes below 2**32; wire types 6 and 7 and an
  end-group tag outside its group are corrupt, and so is field number 0,
  except inside a group (upb skips a group's fields without that check);
- a length is a varint of at most 5 bytes and must stay inside its message;
  any other varint has at most 10 bytes;
- groups (wire types 3 and 4) are skipped, and must close with their own field
  number; groups and messages nest at most ``MAX_DEPTH`` deep;
- a field whose wire type is not its declared one is an unknown field: the
  caller decides, by ``(number, wire)``, which fields it knows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from worker.core.errors import CorruptObject

Buffer = bytes | bytearray | memoryview
MAX_DEPTH = 100  # upb's default nesting limit below the top-level message
VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = range(6)
MASK64 = (1 << 64) - 1
_MAX_TAG = (1 << 32) - 1


def varint(data: Buffer, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` (up to 10 bytes, not masked) and the position after it."""
    byte = data[pos]
    if byte < 0x80:  # nearly every tag and length
        return byte, pos + 1
    value, shift, pos = byte & 0x7F, 7, pos + 1
    while True:
        if shift > 63:
            raise CorruptObject("a varint of more than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(n: int) -> bytes:
    """``n`` (a natural number) as a varint."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _short_varint(data: Buffer, pos: int, what: str) -> tuple[int, int]:
    """A tag or a length: at most 5 bytes."""
    value, after = varint(data, pos)
    if after - pos > 5 or value > _MAX_TAG:
        raise CorruptObject(f"a {what} of more than 32 bits")
    return value, after


def fields(
    data: Buffer, start: int, end: int, depth: int = MAX_DEPTH
) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire type, tag start, value start, value end)`` of every field
    of the message in ``data[start:end]``, groups skipped; ``depth``: the nesting
    still allowed below this message."""
    pos = start
    try:
        while pos < end:
            tag = data[pos]
            if tag & 7 == LENGTH and 8 <= tag < 0x80:  # nearly every field: rows, values
                length, value = varint(data, pos + 1)
                after = value + length
                if value - pos > 6 or after > end:
                    raise CorruptObject("a field runs past the end of its message")
                yield tag >> 3, LENGTH, pos, value, after
                pos = after
                continue
            number, wire, value, after = _field(data, pos, end, depth)
            if number == 0:
                raise CorruptObject("field number 0")
            if wire == END_GROUP:
                raise CorruptObject(f"the end of group {number} outside it")
            if wire != START_GROUP:
                yield number, wire, pos, value, after
            pos = after
    except IndexError:
        raise CorruptObject("the file ends inside a field") from None


def _field(data: Buffer, pos: int, end: int, depth: int) -> tuple[int, int, int, int]:
    """``(number, wire type, value start, end)`` of the field at ``pos``: a group
    skipped whole; an end-group tag returned for the caller to judge."""
    tag, pos = _short_varint(data, pos, "tag")
    number, wire = tag >> 3, tag & 7
    value = pos
    if wire == VARINT:
        _, pos = varint(data, pos)
    elif wire == LENGTH:
        length, value = _short_varint(data, pos, "length")
        pos = value + length
    elif wire == FIXED64:
        pos += 8
    elif wire == FIXED32:
        pos += 4
    elif wire == START_GROUP:
        pos = _skip_group(data, pos, end, number, depth - 1)
    elif wire != END_GROUP:
        raise CorruptObject(f"wire type {wire}")
    if pos > end:
        raise CorruptObject("a field runs past the end of its message")
    return number, wire, value, pos


def _skip_group(data: Buffer, pos: int, end: int, number: int, depth: int) -> int:
    """The position after the group ``number`` whose fields start at ``pos``."""
    if depth < 0:
        raise CorruptObject(f"groups nested more than {MAX_DEPTH} deep")
    while pos < end:
        inner, wire, _, pos = _field(data, pos, end, depth)
        if wire == END_GROUP:
            if inner != number:
                raise CorruptObject(f"group {number} closed by the end of group {inner}")
            return pos
    raise CorruptObject(f"group {number} is never closed")


def message_count(data: Buffer, descriptor: Any) -> int:
    """How many messages a parse of ``data`` as ``descriptor`` would build (the top
    one and every nested one): what the whole-message path's memory grows with."""
    return 1 + _nested(data, 0, len(data), descriptor, MAX_DEPTH)


def _nested(data: Buffer, start: int, end: int, descriptor: Any, depth: int) -> int:
    count = 0
    by_number = descriptor.fields_by_number
    for number, wire, _, value, value_end in fields(data, start, end, depth):
        field = by_number.get(number)
        if wire != LENGTH or field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if depth <= 0:
            raise CorruptObject(f"messages nested more than {MAX_DEPTH} deep")
        count += 1
        if any(f.type == FieldDescriptor.TYPE_MESSAGE for f in field.message_type.fields):
            count += _nested(data, value, value_end, field.message_type, depth - 1)
    return count
