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

def frame_v1(lsn, ts, epoch, group_index, kind, tenant: bytes, payload: bytes) -> bytes:
    length = 40 + len(tenant) + len(payload)
    rest = struct.pack("<QQQIHBB", lsn, ts, epoch, group_index, kind, len(tenant), 0) + tenant + payload
    crc = crc32c(struct.pack("<I", length) + rest)
    return struct.pack("<II", length, crc) + rest

def segment_header_v1(shard, max_group, epoch, first_lsn, capacity, created) -> bytes:
    body = b"OCWALSEG" + struct.pack("<IIIIQQQQ", 1, 4096, shard, max_group, epoch, first_lsn, capacity, created)
    return body + struct.pack("<I", crc32c(body))

def hexdump(b: bytes) -> str:
    return "\n".join(" ".join(f"{x:02x}" for x in b[i:i + 16]) for i in range(0, len(b), 16)) + "\n"

assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
with open("io/tests/fixtures/frame_v1.hex", "w") as f:
    f.write(hexdump(frame_v1(7, 1_700_000_000_000_000, 3, 2, 0x0102, b"acme", b"hello, wal")))
with open("io/tests/fixtures/segment_header_v1.hex", "w") as f:
    f.write(hexdump(segment_header_v1(3, 1 << 16, 2, 1000, 1 << 20, 1_700_000_000_000_000)))
