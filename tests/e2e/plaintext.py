#!/usr/bin/env python3
"""plaintext.py FILE MARKER: exit 1 (and say where) if MARKER occurs in FILE, 0 if it does not.

Reads only the file's data extents (SEEK_DATA/SEEK_HOLE): a sealed volume's backing file is sparse,
and its holes hold nothing. Matches across chunk boundaries are found (the chunks overlap)."""
import os
import sys

path, marker = sys.argv[1], sys.argv[2].encode()
fd = os.open(path, os.O_RDONLY)
size, pos, scanned = os.fstat(fd).st_size, 0, 0
CHUNK = 4 << 20
while pos < size:
    try:
        pos = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:  # ENXIO: no data after pos
        break
    end = os.lseek(fd, pos, os.SEEK_HOLE)
    tail = b""
    while pos < end:
        data = os.pread(fd, min(CHUNK, end - pos), pos)
        hit = (tail + data).find(marker)
        if hit >= 0:
            print(f"plaintext found at offset {pos - len(tail) + hit} of {path}")
            sys.exit(1)
        tail = data[-(len(marker) - 1):]
        pos += len(data)
        scanned += len(data)
print(f"no plaintext in the {scanned} bytes of data of {path}")
