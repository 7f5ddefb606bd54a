#!/usr/bin/env python3
"""Writes fuzzing seeds for the header parser, built from docs/format.md alone (not from the Rust code),
so the unit test that decodes them also checks that the document describes the format exactly."""
import hashlib
import struct
from pathlib import Path

def header(cipher, integrity, journal, fs, tag, key_len, slots, seqno=1):
    h = bytearray(4096)
    h[0:8] = b"SEALCSI\0"
    struct.pack_into("<HHIQ", h, 8, 1, 4096, 0, seqno)
    h[24:40] = bytes(range(16))
    h[40:44] = bytes([cipher, integrity, journal, fs])
    struct.pack_into("<HHI", h, 44, tag, key_len, 4096)
    struct.pack_into("<QQ", h, 56, 1 << 20, 1_700_000_000)
    for i, source in slots:
        s = 128 + 384 * i
        binding = b"\x01\x02\x03"
        wrapped = bytes([0xA5]) * (key_len + 16)
        struct.pack_into("<BBHHHQ", h, s, 1, 1, source, len(binding), len(wrapped), 1_700_000_001)
        h[s + 16:s + 48] = bytes([0x11]) * 32   # identity digest
        h[s + 48:s + 80] = bytes([0x22]) * 32   # salt
        h[s + 80:s + 92] = bytes([0x33]) * 12   # nonce
        h[s + 96:s + 96 + len(binding)] = binding
        h[s + 224:s + 224 + len(wrapped)] = wrapped
    h[4064:] = hashlib.sha256(h[:4064]).digest()
    return bytes(h)

def with_recovery_slot(header_bytes, index, key_len):
    """Adds a kind-2 (recovery) slot as docs/format.md describes it and fixes the checksum."""
    h = bytearray(header_bytes)
    s = 128 + 384 * index
    h[s:s + 384] = bytes(384)
    struct.pack_into("<BBHHHQ", h, s, 1, 2, 0, 32, key_len + 16, 1_700_000_002)
    h[s + 16:s + 48] = hashlib.sha256(bytes([0x44]) * 32).digest()  # digest of the recipient key
    h[s + 96:s + 128] = bytes([0x55]) * 32                          # HPKE enc
    h[s + 224:s + 224 + key_len + 16] = bytes([0x66]) * (key_len + 16)
    h[4064:] = hashlib.sha256(h[:4064]).digest()
    return bytes(h)

out = Path(__file__).parent / "seeds" / "header"
out.mkdir(parents=True, exist_ok=True)
aead = header(1, 1, 1, 1, 48, 96, [(0, 1), (3, 3)])
xts = header(2, 0, 0, 2, 0, 64, [(1, 2)], seqno=7)
(out / "aead-journal-2slots.bin").write_bytes(aead)
(out / "xts-only-1slot.bin").write_bytes(xts)
(out / "aead-recovery-slot.bin").write_bytes(with_recovery_slot(aead, 5, 96))
(out / "region-two-copies.bin").write_bytes(aead + header(1, 1, 2, 0, 48, 96, [(0, 1)], seqno=2))
