#!/usr/bin/env python3
"""Writes the golden byte fixtures of docs/FORMAT.md from an encoder written here,
independently of the Rust code, so the Rust golden tests compare two implementations
of the document. Run from the repository root: python3 tools/golden_fixtures.py"""
import struct

def crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def frame_v1(lsn, ts, epoch, group_index, kind, tenant: bytes, payload: bytes, flags=0) -> bytes:
    """FORMAT.md §2; flags bit 0 (overlapped) only on a group's first frame, in
    segments of version 2."""
    length = 40 + len(tenant) + len(payload)
    rest = struct.pack("<QQQIHBB", lsn, ts, epoch, group_index, kind, len(tenant), flags) + tenant + payload
    crc = crc32c(struct.pack("<I", length) + rest)
    return struct.pack("<II", length, crc) + rest

def segment_header(version, shard, max_group, epoch, first_lsn, capacity, created) -> bytes:
    """FORMAT.md §3.1: versions 1 and 2 share the layout (2 allows overlapped groups)."""
    body = b"OCWALSEG" + struct.pack("<IIIIQQQQ", version, 4096, shard, max_group, epoch, first_lsn, capacity, created)
    return body + struct.pack("<I", crc32c(body))

def str16(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b)) + b

def schema_v1(name, columns, primary_key, indexes) -> bytes:
    """FORMAT.md §5 schema: columns are (name, type tag, flags), flags bit 0 nullable
    and bit 1 dropped; the key and indexes name column slots."""
    out = str16(name) + struct.pack("<H", len(columns))
    for col, tag, flags in columns:
        out += str16(col) + bytes([tag, flags])
    out += bytes([len(primary_key)]) + b"".join(struct.pack("<H", p) for p in primary_key)
    out += bytes([len(indexes)])
    for index, slots in indexes:
        out += str16(index) + bytes([len(slots)]) + b"".join(struct.pack("<H", p) for p in slots)
    return out

def start_migration_v1(table, table_version, steps_json: bytes) -> bytes:
    """FORMAT.md §5 kinds 8 and 12 (the same payload; the kind says the layout)."""
    return bytes([1]) + str16(table) + struct.pack("<QI", table_version, len(steps_json)) + steps_json

def hexdump(b: bytes) -> str:
    return "\n".join(" ".join(f"{x:02x}" for x in b[i:i + 16]) for i in range(0, len(b), 16)) + "\n"

assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
with open("io/tests/fixtures/frame_v1.hex", "w") as f:
    f.write(hexdump(frame_v1(7, 1_700_000_000_000_000, 3, 2, 0x0102, b"acme", b"hello, wal")))
with open("io/tests/fixtures/frame_overlapped.hex", "w") as f:
    f.write(hexdump(frame_v1(7, 1_700_000_000_000_000, 3, 0, 0x0102, b"acme", b"hello, wal", flags=1)))
for version in (1, 2):
    with open(f"io/tests/fixtures/segment_header_v{version}.hex", "w") as f:
        f.write(hexdump(segment_header(version, 3, 1 << 16, 2, 1000, 1 << 20, 1_700_000_000_000_000)))
# A table after a migration dropped `name` and retyped `n` (text -> int): both old
# slots dropped (flags 3), then `n` appended; a later column took the name `name`.
with open("engine/tests/fixtures/create_table_with_dropped_slots_v1.hex", "w") as f:
    f.write(hexdump(bytes([1]) + schema_v1(
        "items",
        [("id", 2, 0), ("name", 1, 3), ("n", 1, 3), ("n", 2, 1), ("name", 1, 1)],
        [0],
        [("by_n", [3])],
    )))
with open("engine/tests/fixtures/start_migration_v1.hex", "w") as f:
    f.write(hexdump(start_migration_v1("items", 3, b'[{"op":"drop_column","name":"doc"}]')))
