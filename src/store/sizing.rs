//! What size a volume gets: the minimums, the rounding, the capacity range of a CSI request, and the one
//! rule that relates a volume's usable size to the size of the device (backing file or backend volume)
//! that holds it. The controllers size new volumes with it and the node sizes expansions, so it lives
//! with the store.
//!
//! Two sizes, never confused:
//! - **usable** bytes: what the top dm-crypt device offers at least (what the pod or its filesystem
//!   gets). Capacity ranges, `capacity_bytes` and GetCapacity speak of these.
//! - **device** bytes: the size of what holds the sealed stack (a node-local backing file, a stacked
//!   backend's volume): the usable bytes plus the header region and, for AEAD, dm-integrity's journal and
//!   tags ([`device_bytes_for_usable`], its inverse [`usable_bytes_of_device`]). The disk budget and
//!   the backend speak of these.

use super::StoreError;
use super::params::VolumeParams;
use crate::header::{FsKind, Integrity};

/// Smallest device a sealed volume is formatted on ([`crate::volume::MIN_DEVICE_SIZE`], what
/// `Volumes::format` accepts): [`device_bytes_for_usable`] never returns less.
pub const MIN_DEVICE_BYTES: u64 = crate::volume::MIN_DEVICE_SIZE;
/// Smallest usable size of an xfs volume: mkfs.xfs (xfsprogs >= 5.19) refuses a filesystem under
/// 300 MiB, and the filesystem is the whole top device. Measured in the test guest (Linux 6.1,
/// xfsprogs 6.1) as backing-file sizes: `volume format --fs xfs` succeeds on a 307 MiB file and fails on
/// 306 MiB with `integrity: hmac-sha256`; succeeds on 301 MiB and fails on 300 MiB with
/// `integrity: none` (300 MiB of top device after the 1 MiB header region). The device sizes
/// [`device_bytes_for_usable`] gives for 300 MiB (312 MiB and 305 MiB) are above both.
pub const XFS_MIN_USABLE_BYTES: u64 = 300 << 20;
/// Usable size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Volume sizes (usable and device) are whole MiB.
pub const SIZE_ALIGN: u64 = 1 << 20;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to).saturating_mul(to)
}

/// The smallest usable size of a volume made with `params` for `fs`: what the smallest device a volume
/// is formatted on ([`MIN_DEVICE_BYTES`]) offers, or [`XFS_MIN_USABLE_BYTES`] for an xfs filesystem.
pub fn min_usable_bytes(params: VolumeParams, fs: Option<FsKind>) -> u64 {
    let smallest = usable_bytes_of_device(params, MIN_DEVICE_BYTES);
    match fs {
        Some(FsKind::Xfs) => XFS_MIN_USABLE_BYTES.max(smallest),
        _ => smallest,
    }
}

/// The usable size a volume made with `params` gets for a capacity range (`0` = unset, as in CSI),
/// at least [`min_usable_bytes`] for `fs`.
pub fn usable_for_range(
    params: VolumeParams,
    fs: Option<FsKind>,
    required: u64,
    limit: u64,
) -> Result<u64, StoreError> {
    let min = min_usable_bytes(params, fs);
    let what = if fs == Some(FsKind::Xfs) {
        format!(
            "an xfs volume (mkfs.xfs makes no filesystem under {} MiB)",
            XFS_MIN_USABLE_BYTES >> 20
        )
    } else {
        "a sealcsi volume".to_string()
    };
    size_for_range_min(required, limit, min, &what)
}

/// The size for a capacity range (`0` = unset, as in CSI), of at least `min` bytes (`what` names the
/// volume in errors). A range below the minimum is rounded up to it when the limit allows (CSI lets a
/// volume exceed `required_bytes`). Whole MiB.
pub fn size_for_range_min(
    required: u64,
    limit: u64,
    min: u64,
    what: &str,
) -> Result<u64, StoreError> {
    let min = round_up(min.max(1), SIZE_ALIGN);
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

/// What a sealed stack may take of its device beyond the header region
/// ([`crate::header::DATA_OFFSET`]): the integrity superblock, its padding and rounding.
pub const SLACK_BYTES: u64 = 4 << 20;

/// The share of a device that an AEAD stack's integrity metadata may take, in 256ths: the journal
/// (dm-integrity's default is 1/128 of the device, `journal_sectors`, at most 64 MiB) and the tags
/// (48 bytes per 4096-byte block, 3/256). An upper bound: 5/256. Measured in the test guest (Linux
/// 6.1): a 64 MiB file gives a 64 864 256-byte top device, a 71 MiB one 71 872 512 bytes.
const AEAD_METADATA_256THS: u64 = 5;

/// The size a device (a node-local backing file, a stacked backend's volume) must have so that the
/// sealed volume on it offers at least `usable` bytes: the header region, and for AEAD the integrity
/// tags and journal, come on top. Whole MiB, and at least [`MIN_DEVICE_BYTES`].
pub fn device_bytes_for_usable(params: VolumeParams, usable: u64) -> u64 {
    let fixed = crate::header::DATA_OFFSET + SLACK_BYTES;
    let device = match params.integrity {
        Integrity::HmacSha256 => (usable.saturating_add(fixed))
            .saturating_mul(256)
            .div_ceil(256 - AEAD_METADATA_256THS),
        Integrity::None => usable.saturating_add(fixed),
    };
    round_up(device, SIZE_ALIGN).max(MIN_DEVICE_BYTES)
}

/// The usable size a sealed volume offers at least on a device of `device` bytes: the inverse of
/// [`device_bytes_for_usable`] (of the device's whole MiB, rounded down to whole MiB), so that
/// `device_bytes_for_usable(usable_bytes_of_device(d)) <= d` for every `d` of at least
/// [`MIN_DEVICE_BYTES`]; 0 for a smaller device, which holds none.
pub fn usable_bytes_of_device(params: VolumeParams, device: u64) -> u64 {
    if device < MIN_DEVICE_BYTES {
        return 0;
    }
    let device = device / SIZE_ALIGN * SIZE_ALIGN;
    let fixed = crate::header::DATA_OFFSET + SLACK_BYTES;
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

    const M: u64 = 1 << 20;

    fn both() -> [VolumeParams; 2] {
        let aead = VolumeParams::default();
        [
            aead,
            VolumeParams {
                integrity: Integrity::None,
                ..aead
            },
        ]
    }

    #[test]
    fn sizes_follow_the_range() {
        let min = 57 * M;
        let size = |r, l| size_for_range_min(r, l, min, "x");
        assert_eq!(size(0, 0).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(size(1, 0).unwrap(), min);
        assert_eq!(size(100 * M + 1, 0).unwrap(), 101 * M);
        assert_eq!(
            size(100 * M + 1, 100 * M + 10).unwrap_err().kind(),
            Kind::OutOfRange
        );
        assert_eq!(size(100 * M, 200 * M + 5).unwrap(), 100 * M);
        assert_eq!(size(0, 100 * M + 5).unwrap(), 100 * M);
        assert_eq!(size(10, 5).unwrap_err().kind(), Kind::InvalidArgument);
        assert_eq!(size(0, M).unwrap_err().kind(), Kind::OutOfRange);
    }

    #[test]
    fn devices_hold_at_least_what_was_asked() {
        for params in both() {
            for usable in [64 * M, 100 * M, 307 * M, 1 << 30, 10 << 30, 1 << 40] {
                let device = device_bytes_for_usable(params, usable);
                assert!(device > usable, "{usable}");
                assert!(device.is_multiple_of(M));
                assert!(usable_bytes_of_device(params, device) >= usable, "{usable}");
                // Not wildly more than needed: within 1 MiB of the bound.
                assert!(usable_bytes_of_device(params, device - M) < usable + M);
            }
        }
        let [aead, xts] = both();
        assert_eq!(device_bytes_for_usable(xts, 64 * M), 69 * M);
        assert_eq!(device_bytes_for_usable(aead, 64 * M), 71 * M);
        assert_eq!(usable_bytes_of_device(aead, M), 0);
        assert_eq!(usable_bytes_of_device(xts, MIN_DEVICE_BYTES - M), 0);
    }

    #[test]
    fn the_smallest_volume_is_what_the_smallest_device_offers() {
        let [aead, xts] = both();
        assert_eq!(min_usable_bytes(aead, None), 57 * M);
        assert_eq!(min_usable_bytes(xts, None), 59 * M);
        for params in both() {
            let min = min_usable_bytes(params, None);
            assert_eq!(device_bytes_for_usable(params, min), MIN_DEVICE_BYTES);
            assert_eq!(usable_for_range(params, None, 1, 0).unwrap(), min);
            // Any usable size, however small, gets a device that can be formatted.
            assert_eq!(device_bytes_for_usable(params, M), MIN_DEVICE_BYTES);
        }
    }

    #[test]
    fn xfs_volumes_have_their_own_minimum() {
        let [aead, xts] = both();
        for params in both() {
            assert_eq!(
                min_usable_bytes(params, Some(FsKind::Ext4)),
                min_usable_bytes(params, None)
            );
            assert_eq!(min_usable_bytes(params, Some(FsKind::Xfs)), 300 * M);
            let xfs = Some(FsKind::Xfs);
            assert_eq!(usable_for_range(params, xfs, 100 * M, 0).unwrap(), 300 * M);
            assert_eq!(
                usable_for_range(params, xfs, 0, 0).unwrap(),
                DEFAULT_VOLUME_BYTES
            );
            assert_eq!(usable_for_range(params, xfs, 0, 310 * M).unwrap(), 310 * M);
            let e = usable_for_range(params, xfs, 100 * M, 299 * M).unwrap_err();
            assert_eq!(e.kind(), Kind::OutOfRange);
            assert!(e.to_string().contains("an xfs volume"), "{e}");
        }
        // The measured facts: mkfs.xfs succeeded on backing files of 307 MiB (hmac-sha256) and 301 MiB
        // (none); the devices made for the xfs minimum are at least that large.
        assert!(device_bytes_for_usable(aead, XFS_MIN_USABLE_BYTES) >= 307 * M);
        assert!(device_bytes_for_usable(xts, XFS_MIN_USABLE_BYTES) >= 301 * M);
    }

    proptest::proptest! {
        #[test]
        fn every_whole_mib_usable_size_fits_its_device(mib in 0u64..(1 << 24), aead: bool) {
            let params = both()[usize::from(!aead)];
            let usable = mib * M;
            let device = device_bytes_for_usable(params, usable);
            proptest::prop_assert!(device >= MIN_DEVICE_BYTES && device.is_multiple_of(M));
            proptest::prop_assert!(usable_bytes_of_device(params, device) >= usable);
            // And the inverse never claims more than a device of that size gives.
            let back = usable_bytes_of_device(params, device);
            proptest::prop_assert!(device_bytes_for_usable(params, back) <= device);
        }

        #[test]
        fn what_a_device_offers_fits_on_it(device in 0u64..(1 << 44), aead: bool) {
            let params = both()[usize::from(!aead)];
            let usable = usable_bytes_of_device(params, device);
            if device < MIN_DEVICE_BYTES {
                proptest::prop_assert_eq!(usable, 0);
            } else {
                proptest::prop_assert!(device_bytes_for_usable(params, usable) <= device);
            }
        }
    }
}
