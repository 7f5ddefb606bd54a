//! What size a volume gets: the minimums, the rounding, and the capacity range of a CSI request. The
//! controller sizes new volumes with it and the node sizes expansions, so it lives with the store.

use super::StoreError;
use super::params::VolumeParams;
use crate::header::{FsKind, Integrity};

/// Smallest volume: what `Volumes::format` accepts ([`crate::volume::MIN_DEVICE_SIZE`]).
pub const MIN_VOLUME_BYTES: u64 = crate::volume::MIN_DEVICE_SIZE;
/// Smallest volume that holds an xfs filesystem, with `integrity: hmac-sha256` (either journal mode).
/// mkfs.xfs (xfsprogs >= 5.19) refuses a filesystem under 300 MB; dm-integrity's tags and journal take
/// the rest. Measured in the test guest (Linux 6.1, xfsprogs 6.1): `volume format --fs xfs` succeeds on a
/// 307 MiB backing file and fails on 306 MiB.
pub const XFS_MIN_VOLUME_BYTES_AEAD: u64 = 307 << 20;
/// Smallest volume that holds an xfs filesystem with `integrity: none` (measured as above: 301 MiB
/// succeeds, 300 MiB fails; the header region takes the difference).
pub const XFS_MIN_VOLUME_BYTES_XTS: u64 = 301 << 20;
/// Size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Volume sizes are whole MiB.
pub const SIZE_ALIGN: u64 = 1 << 20;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// The smallest volume that can hold what it is created for: [`MIN_VOLUME_BYTES`], or more for an xfs
/// filesystem ([`XFS_MIN_VOLUME_BYTES_AEAD`], [`XFS_MIN_VOLUME_BYTES_XTS`]).
pub fn min_volume_bytes(params: VolumeParams, fs: Option<FsKind>) -> u64 {
    match (fs, params.integrity) {
        (Some(FsKind::Xfs), Integrity::HmacSha256) => XFS_MIN_VOLUME_BYTES_AEAD,
        (Some(FsKind::Xfs), Integrity::None) => XFS_MIN_VOLUME_BYTES_XTS,
        _ => MIN_VOLUME_BYTES,
    }
}

/// The size a volume gets for a capacity range (`0` = unset, as in CSI).
pub fn size_for_range(required: u64, limit: u64) -> Result<u64, StoreError> {
    size_for_range_min(required, limit, MIN_VOLUME_BYTES, "a sealcsi volume")
}

/// [`size_for_range`] for a volume of at least `min` bytes (`what` names it in errors). A range below the
/// minimum is rounded up to it when the limit allows (CSI lets a volume exceed `required_bytes`).
pub fn size_for_range_min(
    required: u64,
    limit: u64,
    min: u64,
    what: &str,
) -> Result<u64, StoreError> {
    let min = min.max(MIN_VOLUME_BYTES);
    if limit != 0 && limit < required {
        return Err(StoreError::InvalidArgument(format!(
            "capacity range: limit_bytes {limit} is smaller than required_bytes {required}"
        )));
    }
    let size = if required == 0 {
        let size = DEFAULT_VOLUME_BYTES.max(min);
        if limit != 0 {
            size.min(limit / SIZE_ALIGN * SIZE_ALIGN)
        } else {
            size
        }
    } else {
        round_up(required.max(min), SIZE_ALIGN)
    };
    if limit != 0 && size > limit {
        // Rounding up to whole MiB crossed the limit: use the largest whole MiB within it.
        let within = limit / SIZE_ALIGN * SIZE_ALIGN;
        if within >= required.max(min) {
            return Ok(within);
        }
        return Err(StoreError::OutOfRange(format!(
            "capacity range [{required}, {limit}] allows no volume: {what} needs at least {min} bytes \
             ({} MiB), and sealcsi volumes are whole MiB",
            min >> 20
        )));
    }
    if size < min {
        return Err(StoreError::OutOfRange(format!(
            "capacity limit {limit} is below the smallest size of {what} ({min} bytes, {} MiB)",
            min >> 20
        )));
    }
    Ok(size)
}

/// What a stacked volume's sealed stack may take of its backend device beyond the header region
/// ([`crate::header::DATA_OFFSET`]): the integrity superblock, its padding and rounding.
pub const STACKED_SLACK_BYTES: u64 = 4 << 20;

/// The share of a backend device that an AEAD stack's integrity metadata may take, in 256ths: the
/// journal (dm-integrity's default is 1/128 of the device, `journal_sectors`, at most 64 MiB) and the
/// tags (48 bytes per 4096-byte block, 3/256). An upper bound: 5/256.
const AEAD_METADATA_256THS: u64 = 5;

/// The size a backend (stacked-over) device must have so that the sealed volume on it offers at least
/// `usable` bytes: the header region, and for AEAD the integrity tags and journal, come on top. Whole MiB.
pub fn stacked_device_bytes(params: VolumeParams, usable: u64) -> u64 {
    let fixed = crate::header::DATA_OFFSET + STACKED_SLACK_BYTES;
    let device = match params.integrity {
        Integrity::HmacSha256 => (usable.saturating_add(fixed))
            .saturating_mul(256)
            .div_ceil(256 - AEAD_METADATA_256THS),
        Integrity::None => usable.saturating_add(fixed),
    };
    round_up(device, SIZE_ALIGN)
}

/// The usable size a sealed volume offers at least on a backend device of `device` bytes (the inverse
/// of [`stacked_device_bytes`], rounded down to whole MiB; 0 if it is too small for any).
pub fn stacked_usable_bytes(params: VolumeParams, device: u64) -> u64 {
    let fixed = crate::header::DATA_OFFSET + STACKED_SLACK_BYTES;
    let usable = match params.integrity {
        Integrity::HmacSha256 => (device / 256).saturating_mul(256 - AEAD_METADATA_256THS),
        Integrity::None => device,
    }
    .saturating_sub(fixed);
    usable / SIZE_ALIGN * SIZE_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, Kind};

    #[test]
    fn sizes_follow_the_range() {
        const M: u64 = 1 << 20;
        assert_eq!(size_for_range(0, 0).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(size_for_range(1, 0).unwrap(), MIN_VOLUME_BYTES);
        assert_eq!(size_for_range(100 * M + 1, 0).unwrap(), 101 * M);
        assert_eq!(
            size_for_range(100 * M + 1, 100 * M + 10)
                .unwrap_err()
                .kind(),
            Kind::OutOfRange
        );
        assert_eq!(size_for_range(100 * M, 200 * M + 5).unwrap(), 100 * M);
        assert_eq!(size_for_range(0, 100 * M + 5).unwrap(), 100 * M);
        assert_eq!(
            size_for_range(10, 5).unwrap_err().kind(),
            Kind::InvalidArgument
        );
        assert_eq!(size_for_range(0, M).unwrap_err().kind(), Kind::OutOfRange);
    }

    #[test]
    fn stacked_devices_hold_at_least_what_was_asked() {
        const M: u64 = 1 << 20;
        let aead = VolumeParams::default();
        let xts = VolumeParams {
            integrity: Integrity::None,
            ..aead
        };
        for params in [aead, xts] {
            for usable in [64 * M, 100 * M, 307 * M, 1 << 30, 10 << 30, 1 << 40] {
                let device = stacked_device_bytes(params, usable);
                assert!(device > usable, "{usable}");
                assert_eq!(device % M, 0);
                assert!(stacked_usable_bytes(params, device) >= usable, "{usable}");
                // Not wildly more than needed: within 1 MiB of the bound.
                assert!(stacked_usable_bytes(params, device - M) < usable + M);
            }
        }
        assert_eq!(stacked_device_bytes(xts, 64 * M), 69 * M);
        assert_eq!(stacked_usable_bytes(aead, M), 0);
    }

    #[test]
    fn xfs_volumes_have_their_own_minimum() {
        const M: u64 = 1 << 20;
        let aead = VolumeParams::default();
        let xts = VolumeParams {
            integrity: Integrity::None,
            ..aead
        };
        assert_eq!(min_volume_bytes(aead, None), MIN_VOLUME_BYTES);
        assert_eq!(min_volume_bytes(aead, Some(FsKind::Ext4)), MIN_VOLUME_BYTES);
        assert_eq!(min_volume_bytes(aead, Some(FsKind::Xfs)), 307 * M);
        assert_eq!(min_volume_bytes(xts, Some(FsKind::Xfs)), 301 * M);
        assert_eq!(size_for_range_min(1, 0, 307 * M, "x").unwrap(), 307 * M);
        assert_eq!(
            size_for_range_min(0, 0, 307 * M, "x").unwrap(),
            DEFAULT_VOLUME_BYTES
        );
        assert_eq!(
            size_for_range_min(0, 310 * M, 307 * M, "x").unwrap(),
            310 * M
        );
        let e = size_for_range_min(100 * M, 300 * M, 307 * M, "an xfs volume").unwrap_err();
        assert_eq!(e.kind(), Kind::OutOfRange);
        assert!(e.to_string().contains("an xfs volume"), "{e}");
    }
}
