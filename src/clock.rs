//! Wall-clock time as sealcsi records it.

/// Seconds since the Unix epoch (0 if the clock is before it): creation times in headers and records.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
