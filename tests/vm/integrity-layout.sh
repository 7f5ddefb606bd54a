# shellcheck shell=bash
# Where a logical 4 KiB block of a dm-integrity device (tag 48, 4 KiB blocks) lives on its backing device.
# Sourced by guest scripts. Layout from the kernel's drivers/md/dm-integrity.c
# (calculate_device_limits / get_data_sector): superblock + journal sections, then areas of
# [metadata run: the tags of the area's blocks][2^log2_interleave data sectors].
#
# integrity_locate <backing> <integrity start byte> <logical block>
#   prints "<byte offset of the block's data> <byte offset of its 48-byte tag>" in the backing device.
integrity_locate() {
    local img=$1 start=$2 block=$3
    local -a b
    read -r -d "" -a b < <(dd if="$img" bs=4096 skip=$((start / 4096)) count=1 iflag=direct status=none |
        od -An -v -tu1 -N 32) || true
    local magic
    magic=$(printf '%02x' "${b[@]:0:8}")
    [ "$magic" = 696e746567727400 ] || { echo "integrity_locate: no dm-integrity superblock at byte $start" >&2; return 1; }
    local log2_interleave=${b[9]} tag_size=$((b[10] | b[11] << 8)) log2_spb=${b[28]}
    local journal_sections=$((b[12] | b[13] << 8 | b[14] << 16 | b[15] << 24))
    local spb=$((1 << log2_spb))
    local entry=$(((8 + 8 * spb + tag_size + 7) / 8 * 8))
    local section_sectors=$(((504 / entry) * 8 * spb + 8))
    local initial=$((8 + section_sectors * journal_sections))
    local area_sectors=$((1 << log2_interleave))
    local metadata_run=$((((tag_size << (log2_interleave - log2_spb)) + 4095) / 4096 * 8))
    local sector=$((block * spb))
    local area=$((sector / area_sectors)) in_area=$((sector % area_sectors))
    local area_start=$((initial + area * (metadata_run + area_sectors)))
    local data=$((start + (area_start + metadata_run + in_area) * 512))
    local tag=$((start + area_start * 512 + (in_area / spb) * tag_size))
    echo "$data $tag"
}

# flip_bit <file> <byte offset>: flips bit 0 of one byte, bypassing the page cache.
flip_bit() {
    local img=$1 off=$2 blk tmp old
    blk=$((off / 4096 * 4096))
    tmp=$(mktemp)
    dd if="$img" of="$tmp" bs=4096 skip=$((blk / 4096)) count=1 iflag=direct status=none
    old=$(od -An -tu1 -j $((off - blk)) -N 1 "$tmp" | tr -d ' ')
    printf '%b' "\\$(printf %03o $((old ^ 1)))" | dd of="$tmp" bs=1 seek=$((off - blk)) conv=notrunc status=none
    dd if="$tmp" of="$img" bs=4096 seek=$((blk / 4096)) count=1 oflag=direct conv=notrunc,fsync status=none
    rm -f "$tmp"
}
