#!/usr/bin/env python3
"""flip.py FILE: what a hostile host does to a sealed volume under a running pod: one byte of every
64 KiB of FILE's data (its allocated extents, past the first MiB: the header region) XORed with 0x55,
written in place and synced."""
import os
import sys

fd = os.open(sys.argv[1], os.O_RDWR)
size, pos, flipped = os.fstat(fd).st_size, 1 << 20, 0
while pos < size:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:  # ENXIO: no data after pos
        break
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    for off in range(pos, end, 65536):
        byte = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([byte[0] ^ 0x55]), off)
        flipped += 1
    pos = end
os.fsync(fd)
print(f"flipped {flipped} bytes of {sys.argv[1]}")
