//! The two XFS ioctls sealcsi issues itself: the geometry of a mounted filesystem, and the grow
//! call that (re)writes its secondary superblocks.
//!
//! Why sealcsi needs them: the kernel's growfs (`xfs_growfs_data`) commits the new geometry to
//! the primary superblock through the log, and only afterwards rewrites the secondary
//! superblocks (one per allocation group), without a cache flush. A crash between the two, or
//! before the next flush, leaves secondaries with the old geometry: the kernel mounts and uses
//! the filesystem, but `xfs_repair` stops ("would write modified primary superblock") and would
//! take the primary back towards the secondaries. The retried NodeExpandVolume cannot fix that
//! through `xfs_growfs`, which skips the kernel when the size is already reached ("data size
//! unchanged, skipping"). The grow ioctl with the current size and inode percentage changes
//! nothing but still rewrites every secondary (Linux 4.18 and later, `xfs_update_secondary_sbs`
//! runs on every call), so [`rewrite_secondary_superblocks`] makes them agree with the primary
//! on every growth and on every retry. Measured by the crash-replay suite (docs/crash-consistency.md).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `struct xfs_fsop_geom` (v5, 256 bytes), of which sealcsi reads two fields.
#[repr(C)]
#[derive(Clone, Copy)]
struct FsopGeom {
    blocksize: u32,
    rtextsize: u32,
    agblocks: u32,
    agcount: u32,
    logblocks: u32,
    sectsize: u32,
    inodesize: u32,
    imaxpct: u32,
    datablocks: u64,
    rtblocks: u64,
    rtextents: u64,
    logstart: u64,
    uuid: [u8; 16],
    sunit: u32,
    swidth: u32,
    version: i32,
    flags: u32,
    logsectsize: u32,
    rtsectsize: u32,
    dirblocksize: u32,
    logsunit: u32,
    sick: u32,
    checked: u32,
    reserved: [u64; 17],
}

/// `struct xfs_growfs_data` (16 bytes: the u64 aligns it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GrowfsData {
    newblocks: u64,
    imaxpct: u32,
}

/// `XFS_IOC_FSGEOMETRY` = _IOR('X', 126, struct xfs_fsop_geom).
const XFS_IOC_FSGEOMETRY: u8 = 126;
/// `XFS_IOC_FSGROWFSDATA` = _IOW('X', 110, struct xfs_growfs_data).
const XFS_IOC_FSGROWFSDATA: u8 = 110;

mod raw {
    use super::*;
    nix::ioctl_read!(fs_geometry, b'X', XFS_IOC_FSGEOMETRY, FsopGeom);
    nix::ioctl_write_ptr!(growfs_data, b'X', XFS_IOC_FSGROWFSDATA, GrowfsData);
}

/// The filesystem's data blocks and maximum inode percentage, as the kernel holds them.
fn geometry(mounted: &File) -> io::Result<GrowfsData> {
    let mut geom = std::mem::MaybeUninit::<FsopGeom>::zeroed();
    // SAFETY: the kernel writes one `struct xfs_fsop_geom` (v5; same #[repr(C)] layout, size
    // checked by a test) into the buffer, which is valid, zero-initialized and exclusively
    // borrowed for the call; the fd is open for the call.
    unsafe { raw::fs_geometry(mounted.as_raw_fd(), geom.as_mut_ptr()) }?;
    // SAFETY: zeroed is a valid value of this plain-integer struct, and the kernel filled it in.
    let geom = unsafe { geom.assume_init() };
    Ok(GrowfsData {
        newblocks: geom.datablocks,
        imaxpct: geom.imaxpct,
    })
}

/// Rewrites every secondary superblock of the XFS filesystem mounted at `mount_point` from its
/// primary, changing nothing else: the grow ioctl at the current size and inode percentage.
/// Needs CAP_SYS_ADMIN. The writes are waited for but not flushed: the caller flushes the device.
pub fn rewrite_secondary_superblocks(mount_point: &Path) -> io::Result<()> {
    let dir = File::open(mount_point)?;
    let current = geometry(&dir)?;
    // SAFETY: the kernel reads one `struct xfs_growfs_data` (same #[repr(C)] layout, size checked
    // by a test) from the pointer, which is valid for the call; the fd is open for the call.
    unsafe { raw::growfs_data(dir.as_raw_fd(), &current) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_structs_and_numbers_match_the_kernel_headers() {
        // Sizes from linux/xfs_fs.h (xfs_fsop_geom v5: 256; xfs_growfs_data: 16), and the request
        // numbers as the kernel computes them on x86_64/aarch64 (_IOR/_IOW with those sizes).
        assert_eq!(std::mem::size_of::<FsopGeom>(), 256);
        assert_eq!(std::mem::offset_of!(FsopGeom, imaxpct), 28);
        assert_eq!(std::mem::offset_of!(FsopGeom, datablocks), 32);
        assert_eq!(std::mem::size_of::<GrowfsData>(), 16);
        assert_eq!(
            nix::request_code_read!(b'X', XFS_IOC_FSGEOMETRY, std::mem::size_of::<FsopGeom>()),
            0x8100_587e
        );
        assert_eq!(
            nix::request_code_write!(
                b'X',
                XFS_IOC_FSGROWFSDATA,
                std::mem::size_of::<GrowfsData>()
            ),
            0x4010_586e
        );
    }
}
