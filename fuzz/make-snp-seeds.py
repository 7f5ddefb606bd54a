#!/usr/bin/env python3
"""Writes fuzzing seeds for the SNP evidence parsers from docs/keys.md ("SEV-SNP evidence") alone: a body
in Trustee's snp form (a version-3 Milan report, unsigned) without and with a certificate table, and a
binary certificate table (GHCB extended-report form)."""
import json
import struct
import uuid
from pathlib import Path

def tcb(bl, tee, snp, ucode):
    return {"fmc": None, "bootloader": bl, "tee": tee, "snp": snp, "microcode": ucode}

def report():
    return {
        "version": 3, "guest_svn": 0, "policy": 0x30000, "family_id": [0] * 16, "image_id": [0] * 16,
        "vmpl": 0, "sig_algo": 1, "current_tcb": tcb(3, 0, 8, 115), "plat_info": 0, "key_info": 0,
        "report_data": [0x42] * 64, "measurement": [0x6d] * 48, "host_data": [0] * 32,
        "id_key_digest": [0] * 48, "author_key_digest": [0] * 48, "report_id": [0] * 32,
        "report_id_ma": [0] * 32, "reported_tcb": tcb(3, 0, 8, 115), "cpuid_fam_id": 0x19,
        "cpuid_mod_id": 0x01, "cpuid_step": 1, "chip_id": [0x5c] * 64, "committed_tcb": tcb(3, 0, 8, 115),
        "current": {"major": 1, "minor": 55, "build": 21}, "committed": {"major": 1, "minor": 55, "build": 21},
        "launch_tcb": tcb(3, 0, 8, 115), "launch_mit_vector": None, "current_mit_vector": None,
        "signature": {"r": [1] * 72, "s": [2] * 72},
    }

def table(entries):
    head = bytearray(24 * (len(entries) + 1))
    data = bytearray()
    for i, (guid, blob) in enumerate(entries):
        struct.pack_into("<16sII", head, 24 * i, uuid.UUID(guid).bytes, len(head) + len(data), len(blob))
        data += blob
    return bytes(head + data)

out = Path(__file__).parent / "seeds" / "snp_evidence"
out.mkdir(parents=True, exist_ok=True)
(out / "body-no-table.json").write_text(json.dumps({"attestation_report": report(), "cert_chain": None}))
(out / "body-table.json").write_text(json.dumps({"attestation_report": report(), "cert_chain": [
    {"cert_type": "VCEK", "data": [48, 130, 1, 0]}, {"cert_type": "ASK", "data": [1, 2, 3]}]}))
(out / "cert-table.bin").write_bytes(table([
    ("63da758d-e664-4564-adc5-f4b93be8accd", b"vcek"), ("4ab7b379-bbac-4fe4-a02f-05aef327c782", b"ask"),
    ("c0b406a4-a803-4952-9743-3fb6014cd0ae", b"ark")]))
