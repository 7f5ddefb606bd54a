//! Typed device-mapper table lines for the two targets sealcsi stacks: `integrity` (AEAD mode, no
//! internal hash) under `crypt`.
//!
//! Each target renders its parameter string with [`IntegrityTarget::params`] /
//! [`CryptTarget::params`] and parses it back strictly with `parse`/`FromStr`, so that the table
//! the kernel reports (`DM_TABLE_STATUS` with `DM_STATUS_TABLE`) reads back into the same value.
//! Sizes are in 512-byte sectors unless the name says otherwise.
//!
//! The kernel accepts several tables that silently do something else than asked (a 64-byte key for
//! the authenc cipher becomes AES-128-XTS, a wrong option count mis-parses the options); the
//! `validate` methods refuse those before anything reaches the kernel, and option counts are always
//! computed from the rendered option list.
//!
//! Error messages never contain key material: tokens that could be a key are redacted.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use zeroize::{Zeroize, Zeroizing};

/// Why a table line was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TableError {
    /// The parameter string is malformed (wrong token count, bad number, ...).
    #[error("malformed {target} table: {reason}")]
    Malformed {
        target: &'static str,
        reason: String,
    },
    /// An option the target does not know, or that sealcsi never sets.
    #[error("unsupported {target} option {option}")]
    UnsupportedOption {
        target: &'static str,
        option: String,
    },
    /// The option count does not match the options that follow.
    #[error("{target} option count {declared} but {found} options follow")]
    OptionCount {
        target: &'static str,
        declared: usize,
        found: usize,
    },
    /// A value is outside the range the kernel (or sealcsi) accepts.
    #[error("{target} {what} {value} out of range ({range})")]
    OutOfRange {
        target: &'static str,
        what: &'static str,
        value: u64,
        range: &'static str,
    },
    /// The parameters are individually valid but inconsistent (key length vs. cipher, ...).
    #[error("inconsistent {target} table: {reason}")]
    Inconsistent {
        target: &'static str,
        reason: String,
    },
    /// The target type is neither `integrity` nor `crypt`.
    #[error("unsupported target type {0}")]
    UnsupportedTarget(String),
}

const INTEGRITY: &str = "integrity";
const CRYPT: &str = "crypt";

/// Largest tag size accepted (bytes). The kernel's own limit is larger; no AEAD we use needs more.
pub const MAX_TAG_SIZE: u32 = 255;

/// Show a token in an error message only if it cannot be key material: short and not all hex.
fn shown(token: &str) -> String {
    let printable = token.chars().all(|c| c.is_ascii_graphic());
    if printable && token.len() <= 40 && !token.chars().all(|c| c.is_ascii_hexdigit()) {
        format!("`{token}`")
    } else {
        format!("<{} chars redacted>", token.len())
    }
}

fn malformed(target: &'static str, reason: impl Into<String>) -> TableError {
    TableError::Malformed {
        target,
        reason: reason.into(),
    }
}

fn parse_u64(target: &'static str, what: &str, token: &str) -> Result<u64, TableError> {
    // u64::from_str accepts a leading '+', the kernel's %llu-with-%c check does too, but we never
    // render one: refuse it so that parse(render(x)) is the only accepted spelling.
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(
            target,
            format!("{what} {} is not a decimal number", shown(token)),
        ));
    }
    token.parse::<u64>().map_err(|_| {
        malformed(
            target,
            format!("{what} {} does not fit in 64 bits", shown(token)),
        )
    })
}

fn parse_u32(target: &'static str, what: &'static str, token: &str) -> Result<u32, TableError> {
    let v = parse_u64(target, what, token)?;
    u32::try_from(v).map_err(|_| TableError::OutOfRange {
        target,
        what,
        value: v,
        range: "32 bits",
    })
}

/// A device token: a path or the kernel's `major:minor`. Must be non-empty, without whitespace.
fn check_device(target: &'static str, device: &Path) -> Result<(), TableError> {
    let s = device
        .to_str()
        .ok_or_else(|| malformed(target, "device path is not UTF-8"))?;
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed(
            target,
            "device path is empty or contains whitespace",
        ));
    }
    Ok(())
}

fn check_block_size(target: &'static str, what: &'static str, v: u32) -> Result<(), TableError> {
    if !(512..=4096).contains(&v) || !v.is_power_of_two() {
        return Err(TableError::OutOfRange {
            target,
            what,
            value: u64::from(v),
            range: "512, 1024, 2048 or 4096",
        });
    }
    Ok(())
}

fn check_tag_size(target: &'static str, v: u32) -> Result<(), TableError> {
    if !(1..=MAX_TAG_SIZE).contains(&v) {
        return Err(TableError::OutOfRange {
            target,
            what: "tag size",
            value: u64::from(v),
            range: "1..=255",
        });
    }
    Ok(())
}

/// Split `<n> <opt>...` at `tokens`, checking that exactly n options follow.
fn split_options<'a>(target: &'static str, tokens: &[&'a str]) -> Result<Vec<&'a str>, TableError> {
    let Some((count, rest)) = tokens.split_first() else {
        return Ok(Vec::new());
    };
    let declared = parse_u64(target, "option count", count)?;
    let declared = usize::try_from(declared).unwrap_or(usize::MAX);
    if declared != rest.len() {
        return Err(TableError::OptionCount {
            target,
            declared,
            found: rest.len(),
        });
    }
    Ok(rest.to_vec())
}

fn set_once<T>(
    target: &'static str,
    slot: &mut Option<T>,
    value: T,
    name: &str,
) -> Result<(), TableError> {
    if slot.is_some() {
        return Err(malformed(target, format!("option {name} given twice")));
    }
    *slot = Some(value);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// integrity

/// dm-integrity journal mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JournalMode {
    /// `J`: data and tags go through the journal first; crash-safe (what sealcsi uses by default).
    Journal,
    /// `D`: direct writes without a journal. NOT crash-safe: a crash between the data write and the
    /// tag write leaves blocks whose tags do not match, which then read as integrity errors.
    /// Faster (see dm-facts: ~116 vs 87 MiB/s write).
    Direct,
}

impl JournalMode {
    /// The mode letter in the table.
    pub fn as_char(self) -> char {
        match self {
            JournalMode::Journal => 'J',
            JournalMode::Direct => 'D',
        }
    }
}

/// The `integrity` target in AEAD mode: dm-integrity stores the tags, dm-crypt above computes and
/// checks them (no `internal_hash`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IntegrityTarget {
    /// Underlying device: a path when loading; the kernel reports `major:minor`.
    pub device: PathBuf,
    /// Start on the underlying device, in sectors (the superblock is written there).
    pub offset_sectors: u64,
    /// Bytes of tag per block; must equal the crypt target's `integrity:<n>:aead`.
    pub tag_size: u32,
    pub mode: JournalMode,
    /// Data block size in bytes: 512, 1024, 2048 or 4096.
    pub block_size: u32,
    /// `fix_padding`: the padding fix all new devices should use (set at format, remembered in the
    /// superblock).
    pub fix_padding: bool,
    /// `journal_sectors`: the journal's size when the kernel FORMATS the device (it keeps the journal
    /// in memory, so this is also its memory); ignored when a superblock exists, whose journal wins.
    /// Never set by a parse: the kernel reports the size it found, which is not a choice.
    pub journal_sectors: Option<u64>,
}

/// Options the kernel reports back in its table for values it chose itself (sealcsi never sets
/// them). They are accepted on parse with a decimal value and not kept.
const INTEGRITY_KERNEL_REPORTED: &[&str] = &[
    "journal_sectors",
    "interleave_sectors",
    "buffer_sectors",
    "journal_watermark",
    "commit_time",
];

impl IntegrityTarget {
    /// The device-mapper target type.
    pub const TARGET_TYPE: &'static str = INTEGRITY;

    /// Check every field against what the kernel accepts and what sealcsi allows.
    pub fn validate(&self) -> Result<(), TableError> {
        check_device(INTEGRITY, &self.device)?;
        check_tag_size(INTEGRITY, self.tag_size)?;
        check_block_size(INTEGRITY, "block size", self.block_size)?;
        Ok(())
    }

    fn options(&self) -> Vec<String> {
        let mut opts = Vec::new();
        if self.fix_padding {
            opts.push("fix_padding".to_owned());
        }
        opts.push(format!("block_size:{}", self.block_size));
        if let Some(n) = self.journal_sectors {
            opts.push(format!("journal_sectors:{n}"));
        }
        opts
    }

    /// The table parameters: `<dev> <offset> <tag_size> <J|D> <n> [fix_padding] block_size:<b>`,
    /// `n` counted from the options rendered.
    pub fn params(&self) -> Zeroizing<String> {
        let opts = self.options();
        let mut s = format!(
            "{} {} {} {} {}",
            self.device.display(),
            self.offset_sectors,
            self.tag_size,
            self.mode.as_char(),
            opts.len()
        );
        for o in &opts {
            s.push(' ');
            s.push_str(o);
        }
        Zeroizing::new(s)
    }

    /// Strict parse of the parameters, as rendered by [`Self::params`] or reported by the kernel.
    pub fn parse(params: &str) -> Result<Self, TableError> {
        let tokens: Vec<&str> = params.split_ascii_whitespace().collect();
        if tokens.len() < 4 {
            return Err(malformed(
                INTEGRITY,
                format!("{} tokens, need at least 4", tokens.len()),
            ));
        }
        let device = PathBuf::from(tokens[0]);
        let offset_sectors = parse_u64(INTEGRITY, "offset", tokens[1])?;
        let tag_size = parse_u32(INTEGRITY, "tag size", tokens[2])?;
        let mode = match tokens[3] {
            "J" => JournalMode::Journal,
            "D" => JournalMode::Direct,
            other => {
                return Err(TableError::UnsupportedOption {
                    target: INTEGRITY,
                    option: format!("mode {}", shown(other)),
                });
            }
        };
        let opts = split_options(INTEGRITY, &tokens[4..])?;
        let mut block_size = None;
        let mut fix_padding = false;
        let mut seen_reported: Vec<&str> = Vec::new();
        for opt in opts {
            let (name, value) = match opt.split_once(':') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            match (name, value) {
                ("fix_padding", None) => {
                    if fix_padding {
                        return Err(malformed(INTEGRITY, "option fix_padding given twice"));
                    }
                    fix_padding = true;
                }
                ("block_size", Some(v)) => {
                    let v = parse_u32(INTEGRITY, "block size", v)?;
                    set_once(INTEGRITY, &mut block_size, v, "block_size")?;
                }
                (n, Some(v)) if INTEGRITY_KERNEL_REPORTED.contains(&n) => {
                    parse_u64(INTEGRITY, "option value", v)?;
                    if seen_reported.contains(&n) {
                        return Err(malformed(INTEGRITY, format!("option {n} given twice")));
                    }
                    seen_reported.push(n);
                }
                _ => {
                    return Err(TableError::UnsupportedOption {
                        target: INTEGRITY,
                        option: shown(opt),
                    });
                }
            }
        }
        let t = IntegrityTarget {
            device,
            offset_sectors,
            tag_size,
            mode,
            block_size: block_size.unwrap_or(512),
            fix_padding,
            journal_sectors: None,
        };
        t.validate()?;
        Ok(t)
    }
}

impl FromStr for IntegrityTarget {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// crypt

/// The ciphers sealcsi loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptCipher {
    /// `capi:authenc(hmac(sha256),xts(aes))-random`: AES-256-XTS + HMAC-SHA256 as AEAD, random IV
    /// stored in the tag. Key 96 bytes = 64 XTS + 32 HMAC; integrity tag 48 = 32 HMAC + 16 IV.
    AuthencHmacSha256XtsPlainRandom,
    /// `aes-xts-plain64`: AES-256-XTS without integrity. Key 64 bytes.
    AesXtsPlain64,
}

impl CryptCipher {
    /// The cipher string in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptCipher::AuthencHmacSha256XtsPlainRandom => {
                "capi:authenc(hmac(sha256),xts(aes))-random"
            }
            CryptCipher::AesXtsPlain64 => "aes-xts-plain64",
        }
    }

    /// The only key length (bytes) sealcsi accepts for this cipher. The kernel accepts shorter
    /// keys for authenc and silently weakens the cipher; we refuse them.
    pub fn key_len(self) -> usize {
        match self {
            CryptCipher::AuthencHmacSha256XtsPlainRandom => 96,
            CryptCipher::AesXtsPlain64 => 64,
        }
    }

    /// The integrity tag size this cipher needs from the dm-integrity device below (`None`: no
    /// integrity). The kernel accepts truncated HMAC tags (28, 32); we refuse them.
    pub fn integrity_tag_size(self) -> Option<u32> {
        match self {
            CryptCipher::AuthencHmacSha256XtsPlainRandom => Some(48),
            CryptCipher::AesXtsPlain64 => None,
        }
    }

    fn from_table(s: &str) -> Option<Self> {
        [
            CryptCipher::AuthencHmacSha256XtsPlainRandom,
            CryptCipher::AesXtsPlain64,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

impl fmt::Display for CryptCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where dm-crypt takes its key from.
#[derive(Clone, PartialEq, Eq)]
pub enum CryptKey {
    /// A `logon` key in the kernel keyring, looked up at table load; the table carries only
    /// `:<len>:logon:<description>`. Preferred: no secret in the table string.
    Keyring { description: String },
    /// The key itself, rendered as hex into the table (load with DM_SECURE_DATA).
    Hex(Zeroizing<Vec<u8>>),
}

impl fmt::Debug for CryptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptKey::Keyring { description } => f
                .debug_struct("Keyring")
                .field("description", description)
                .finish(),
            CryptKey::Hex(k) => write!(f, "Hex(<{} bytes redacted>)", k.len()),
        }
    }
}

/// Check a logon key description: `<prefix>:<rest>` (the kernel's logon type wants a prefix),
/// printable, no whitespace (it is one table token).
pub fn check_logon_description(description: &str) -> Result<(), TableError> {
    let ok = !description.is_empty()
        && description.len() <= 4095
        && description.chars().all(|c| c.is_ascii_graphic())
        && description.find(':').is_some_and(|i| i > 0);
    if ok {
        Ok(())
    } else {
        Err(malformed(
            CRYPT,
            "keyring description must be printable ASCII `prefix:name` without spaces",
        ))
    }
}

/// The `crypt` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptTarget {
    pub cipher: CryptCipher,
    pub key: CryptKey,
    /// Key length in bytes; must equal `cipher.key_len()` (and the hex key's length).
    pub key_len: usize,
    /// IV offset, in sectors.
    pub iv_offset: u64,
    /// Underlying device: a path when loading; the kernel reports `major:minor`.
    pub device: PathBuf,
    /// Start on the underlying device, in sectors.
    pub offset_sectors: u64,
    /// `integrity:<n>:aead`: the tag bytes per sector dm-integrity below provides.
    pub integrity_tag_size: Option<u32>,
    /// Encryption sector size in bytes: 512..=4096, power of two.
    pub sector_size: u32,
    pub no_read_workqueue: bool,
    pub no_write_workqueue: bool,
}

impl CryptTarget {
    /// The device-mapper target type.
    pub const TARGET_TYPE: &'static str = CRYPT;

    /// Build a crypt target for `cipher`, taking key length and integrity tag from the cipher, and
    /// validate it. `sector_size` 4096, both workqueues bypassed (the tables in dm-facts).
    pub fn new(
        cipher: CryptCipher,
        key: CryptKey,
        device: PathBuf,
        offset_sectors: u64,
        sector_size: u32,
    ) -> Result<Self, TableError> {
        let t = CryptTarget {
            cipher,
            key,
            key_len: cipher.key_len(),
            iv_offset: 0,
            device,
            offset_sectors,
            integrity_tag_size: cipher.integrity_tag_size(),
            sector_size,
            no_read_workqueue: true,
            no_write_workqueue: true,
        };
        t.validate()?;
        Ok(t)
    }

    /// Refuse every table the kernel would accept but that is not what we mean: key length not the
    /// cipher's, a hex key of another length, an integrity tag that does not match the cipher.
    pub fn validate(&self) -> Result<(), TableError> {
        check_device(CRYPT, &self.device)?;
        check_block_size(CRYPT, "sector size", self.sector_size)?;
        if self.key_len != self.cipher.key_len() {
            return Err(TableError::Inconsistent {
                target: CRYPT,
                reason: format!(
                    "key length {} but {} needs {}",
                    self.key_len,
                    self.cipher,
                    self.cipher.key_len()
                ),
            });
        }
        match &self.key {
            CryptKey::Hex(k) if k.len() != self.key_len => {
                return Err(TableError::Inconsistent {
                    target: CRYPT,
                    reason: format!(
                        "hex key has {} bytes, key length says {}",
                        k.len(),
                        self.key_len
                    ),
                });
            }
            CryptKey::Keyring { description } => check_logon_description(description)?,
            CryptKey::Hex(_) => {}
        }
        if let Some(t) = self.integrity_tag_size {
            check_tag_size(CRYPT, t)?;
        }
        if self.integrity_tag_size != self.cipher.integrity_tag_size() {
            return Err(TableError::Inconsistent {
                target: CRYPT,
                reason: format!(
                    "integrity tag {:?} but {} needs {:?}",
                    self.integrity_tag_size,
                    self.cipher,
                    self.cipher.integrity_tag_size()
                ),
            });
        }
        Ok(())
    }

    fn options(&self) -> Vec<String> {
        let mut opts = Vec::new();
        if let Some(t) = self.integrity_tag_size {
            opts.push(format!("integrity:{t}:aead"));
        }
        if self.sector_size != 512 {
            opts.push(format!("sector_size:{}", self.sector_size));
        }
        if self.no_read_workqueue {
            opts.push("no_read_workqueue".to_owned());
        }
        if self.no_write_workqueue {
            opts.push("no_write_workqueue".to_owned());
        }
        opts
    }

    /// The table parameters: `<cipher> <key> <iv_offset> <dev> <offset> [<n> <opt>...]`. May contain
    /// the key in hex: zeroized on drop, never log it.
    pub fn params(&self) -> Zeroizing<String> {
        let opts = self.options();
        let key_chars = match &self.key {
            CryptKey::Hex(k) => 2 * k.len(),
            CryptKey::Keyring { description } => description.len() + 16,
        };
        // Reserve everything up front: a reallocation would leave a copy of the key behind.
        let cap = 256
            + key_chars
            + self.device.as_os_str().len()
            + opts.iter().map(|o| o.len() + 1).sum::<usize>();
        let mut s = Zeroizing::new(String::with_capacity(cap));
        let allocated = s.capacity();
        s.push_str(self.cipher.as_str());
        s.push(' ');
        match &self.key {
            CryptKey::Hex(k) => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                for b in k.iter() {
                    s.push(char::from(HEX[usize::from(b >> 4)]));
                    s.push(char::from(HEX[usize::from(b & 0xf)]));
                }
            }
            CryptKey::Keyring { description } => {
                let _ = write!(s, ":{}:logon:{}", self.key_len, description);
            }
        }
        let _ = write!(
            s,
            " {} {} {}",
            self.iv_offset,
            self.device.display(),
            self.offset_sectors
        );
        if !opts.is_empty() {
            let _ = write!(s, " {}", opts.len());
            for o in &opts {
                s.push(' ');
                s.push_str(o);
            }
        }
        debug_assert_eq!(s.capacity(), allocated, "params reallocated");
        s
    }

    /// Strict parse of the parameters, as rendered by [`Self::params`] or reported by the kernel
    /// (which orders options differently and omits `sector_size:512`).
    pub fn parse(params: &str) -> Result<Self, TableError> {
        let tokens: Vec<&str> = params.split_ascii_whitespace().collect();
        if tokens.len() < 5 {
            return Err(malformed(
                CRYPT,
                format!("{} tokens, need at least 5", tokens.len()),
            ));
        }
        let cipher =
            CryptCipher::from_table(tokens[0]).ok_or_else(|| TableError::UnsupportedOption {
                target: CRYPT,
                option: format!("cipher {}", shown(tokens[0])),
            })?;
        let (key, key_len) = parse_key(tokens[1])?;
        let iv_offset = parse_u64(CRYPT, "iv offset", tokens[2])?;
        let device = PathBuf::from(tokens[3]);
        let offset_sectors = parse_u64(CRYPT, "offset", tokens[4])?;
        let opts = split_options(CRYPT, &tokens[5..])?;
        let mut integrity = None;
        let mut sector_size = None;
        let mut no_read_workqueue = false;
        let mut no_write_workqueue = false;
        for opt in opts {
            match opt {
                "no_read_workqueue" if !no_read_workqueue => no_read_workqueue = true,
                "no_write_workqueue" if !no_write_workqueue => no_write_workqueue = true,
                "no_read_workqueue" | "no_write_workqueue" => {
                    return Err(malformed(CRYPT, format!("option {opt} given twice")));
                }
                _ => {
                    if let Some(rest) = opt.strip_prefix("integrity:") {
                        let Some((n, kind)) = rest.split_once(':') else {
                            return Err(malformed(
                                CRYPT,
                                "integrity option is not integrity:<n>:<type>",
                            ));
                        };
                        if kind != "aead" {
                            return Err(TableError::UnsupportedOption {
                                target: CRYPT,
                                option: format!("integrity type {}", shown(kind)),
                            });
                        }
                        let n = parse_u32(CRYPT, "integrity tag size", n)?;
                        set_once(CRYPT, &mut integrity, n, "integrity")?;
                    } else if let Some(v) = opt.strip_prefix("sector_size:") {
                        let v = parse_u32(CRYPT, "sector size", v)?;
                        set_once(CRYPT, &mut sector_size, v, "sector_size")?;
                    } else {
                        return Err(TableError::UnsupportedOption {
                            target: CRYPT,
                            option: shown(opt),
                        });
                    }
                }
            }
        }
        let t = CryptTarget {
            cipher,
            key,
            key_len,
            iv_offset,
            device,
            offset_sectors,
            integrity_tag_size: integrity,
            sector_size: sector_size.unwrap_or(512),
            no_read_workqueue,
            no_write_workqueue,
        };
        t.validate()?;
        Ok(t)
    }
}

/// `:<len>:logon:<description>` or the hex key.
fn parse_key(token: &str) -> Result<(CryptKey, usize), TableError> {
    if let Some(rest) = token.strip_prefix(':') {
        let Some((len, rest)) = rest.split_once(':') else {
            return Err(malformed(
                CRYPT,
                "keyring key is not :<len>:<type>:<description>",
            ));
        };
        let len = parse_u64(CRYPT, "key length", len)?;
        let len = usize::try_from(len).map_err(|_| malformed(CRYPT, "key length too large"))?;
        let Some(description) = rest.strip_prefix("logon:") else {
            return Err(TableError::UnsupportedOption {
                target: CRYPT,
                option: "key type other than logon".into(),
            });
        };
        check_logon_description(description)?;
        return Ok((
            CryptKey::Keyring {
                description: description.to_owned(),
            },
            len,
        ));
    }
    if token == "-" {
        return Err(TableError::UnsupportedOption {
            target: CRYPT,
            option: "empty key `-`".into(),
        });
    }
    if !token.len().is_multiple_of(2) || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Never echo: this token is meant to be a key.
        return Err(malformed(
            CRYPT,
            "key is neither hex nor :<len>:logon:<description>",
        ));
    }
    let mut key = Zeroizing::new(vec![0u8; token.len() / 2]);
    hex::decode_to_slice(token, &mut key[..])
        .map_err(|_| malformed(CRYPT, "key is not valid hex"))?;
    let len = key.len();
    Ok((CryptKey::Hex(key), len))
}

impl FromStr for CryptTarget {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// lines

/// One target of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Integrity(IntegrityTarget),
    Crypt(CryptTarget),
}

impl Target {
    /// `"integrity"` or `"crypt"`.
    pub fn target_type(&self) -> &'static str {
        match self {
            Target::Integrity(_) => INTEGRITY,
            Target::Crypt(_) => CRYPT,
        }
    }

    /// The parameter string (may contain a key).
    pub fn params(&self) -> Zeroizing<String> {
        match self {
            Target::Integrity(t) => t.params(),
            Target::Crypt(t) => t.params(),
        }
    }

    pub fn validate(&self) -> Result<(), TableError> {
        match self {
            Target::Integrity(t) => t.validate(),
            Target::Crypt(t) => t.validate(),
        }
    }

    /// Parse `params` as a target of type `target_type`.
    pub fn parse(target_type: &str, params: &str) -> Result<Self, TableError> {
        match target_type {
            INTEGRITY => IntegrityTarget::parse(params).map(Target::Integrity),
            CRYPT => CryptTarget::parse(params).map(Target::Crypt),
            other => Err(TableError::UnsupportedTarget(shown(other))),
        }
    }

    /// The underlying device.
    pub fn device(&self) -> &Path {
        match self {
            Target::Integrity(t) => &t.device,
            Target::Crypt(t) => &t.device,
        }
    }

    /// Replace the underlying device (e.g. by its `major:minor` for comparisons).
    pub fn set_device(&mut self, device: PathBuf) {
        match self {
            Target::Integrity(t) => t.device = device,
            Target::Crypt(t) => t.device = device,
        }
    }
}

/// One line of a table: `<start> <length> <type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetLine {
    /// First sector of the mapped device this target covers.
    pub start: u64,
    /// Sectors covered.
    pub length: u64,
    pub target: Target,
}

/// A raw line for the ioctl layer: (start, length, type, params). The params are zeroized on drop.
pub type RawLine = (u64, u64, &'static str, Zeroizing<String>);

impl TargetLine {
    /// The line as the ioctl layer takes it.
    pub fn to_raw(&self) -> RawLine {
        (
            self.start,
            self.length,
            self.target.target_type(),
            self.target.params(),
        )
    }

    /// Parse a line the kernel reported.
    pub fn from_raw(
        start: u64,
        length: u64,
        target_type: &str,
        params: &str,
    ) -> Result<Self, TableError> {
        Ok(TargetLine {
            start,
            length,
            target: Target::parse(target_type, params)?,
        })
    }
}

/// Validate a whole table: non-empty, each target valid and non-empty, lines contiguous from 0.
pub fn validate_table(lines: &[TargetLine]) -> Result<(), TableError> {
    if lines.is_empty() {
        return Err(TableError::Malformed {
            target: "table",
            reason: "no target lines".into(),
        });
    }
    let mut next = 0u64;
    for (i, line) in lines.iter().enumerate() {
        line.target.validate()?;
        let target = line.target.target_type();
        if line.length == 0 {
            return Err(malformed(target, format!("line {i} has length 0")));
        }
        if line.start != next {
            return Err(malformed(
                target,
                format!("line {i} starts at {} instead of {next}", line.start),
            ));
        }
        next = line
            .start
            .checked_add(line.length)
            .ok_or_else(|| malformed(target, format!("line {i} ends beyond 2^64 sectors")))?;
    }
    Ok(())
}

/// Wipe the params of raw lines in place (for `String`s handed to APIs that want plain strings).
pub(crate) fn wipe_strings(v: &mut [(u64, u64, String, String)]) {
    for line in v {
        line.3.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn integrity() -> IntegrityTarget {
        IntegrityTarget {
            device: "/dev/loop0".into(),
            offset_sectors: 0,
            tag_size: 48,
            mode: JournalMode::Journal,
            block_size: 4096,
            fix_padding: true,
            journal_sectors: None,
        }
    }

    fn authenc(key: CryptKey) -> CryptTarget {
        CryptTarget::new(
            CryptCipher::AuthencHmacSha256XtsPlainRandom,
            key,
            "/dev/mapper/i".into(),
            0,
            4096,
        )
        .unwrap()
    }

    fn hex_key(n: usize) -> CryptKey {
        CryptKey::Hex(Zeroizing::new((0..n).map(|i| i as u8).collect()))
    }

    #[test]
    fn integrity_renders_the_accepted_table() {
        assert_eq!(
            integrity().params().as_str(),
            "/dev/loop0 0 48 J 2 fix_padding block_size:4096"
        );
        let d = IntegrityTarget {
            mode: JournalMode::Direct,
            fix_padding: false,
            offset_sectors: 8,
            ..integrity()
        };
        assert_eq!(d.params().as_str(), "/dev/loop0 8 48 D 1 block_size:4096");
        let sized = IntegrityTarget {
            journal_sectors: Some(16384),
            ..integrity()
        };
        assert_eq!(
            sized.params().as_str(),
            "/dev/loop0 0 48 J 3 fix_padding block_size:4096 journal_sectors:16384"
        );
        // What the kernel reports back is the journal it found, never kept as a choice.
        assert_eq!(
            IntegrityTarget::parse(&sized.params()).unwrap(),
            integrity()
        );
    }

    #[test]
    fn integrity_parses_kernel_readback() {
        // Order and extra defaults as dm-integrity's STATUSTYPE_TABLE prints them (6.1).
        let k = "7:0 0 48 J 7 block_size:4096 journal_sectors:3168 interleave_sectors:32768 \
                 buffer_sectors:128 journal_watermark:50 commit_time:10000 fix_padding";
        let t = IntegrityTarget::parse(k).unwrap();
        assert_eq!(
            t,
            IntegrityTarget {
                device: "7:0".into(),
                ..integrity()
            }
        );
        // block_size:512 is not printed by the kernel.
        let t = IntegrityTarget::parse("7:0 0 48 J 0").unwrap();
        assert_eq!(t.block_size, 512);
    }

    #[test]
    fn integrity_rejects() {
        for bad in [
            "",
            "/dev/x 0 48",
            "/dev/x 0 48 J 3 fix_padding block_size:4096", // count too high
            "/dev/x 0 48 J 1 fix_padding block_size:4096", // count too low
            "/dev/x 0 48 B 1 block_size:4096",             // bitmap mode
            "/dev/x 0 48 J 1 block_size:8192",             // block size range
            "/dev/x 0 48 J 1 block_size:1000",             // not a power of two
            "/dev/x 0 0 J 1 block_size:4096",              // tag 0
            "/dev/x 0 256 J 1 block_size:4096",            // tag too large
            "/dev/x 0 48 J 1 internal_hash:crc32c",        // unsupported option
            "/dev/x 0 48 J 1 recalculate",
            "/dev/x 0 48 J 2 block_size:4096 block_size:4096",
            "/dev/x 0 48 J 2 fix_padding fix_padding",
            "/dev/x -1 48 J 0",
            "/dev/x +1 48 J 0",
            "/dev/x 0 48 J 1 journal_sectors:x",
        ] {
            assert!(IntegrityTarget::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn crypt_renders_the_accepted_tables() {
        let key = hex_key(96);
        let hex: String = (0..96u8).map(|b| format!("{b:02x}")).collect();
        let t = authenc(key);
        assert_eq!(
            t.params().as_str(),
            format!(
                "capi:authenc(hmac(sha256),xts(aes))-random {hex} 0 /dev/mapper/i 0 4 integrity:48:aead \
                 sector_size:4096 no_read_workqueue no_write_workqueue"
            )
        );
        let t = authenc(CryptKey::Keyring {
            description: "sealcsi:vol1".into(),
        });
        assert_eq!(
            t.params().as_str(),
            "capi:authenc(hmac(sha256),xts(aes))-random :96:logon:sealcsi:vol1 0 /dev/mapper/i 0 4 \
             integrity:48:aead sector_size:4096 no_read_workqueue no_write_workqueue"
        );
        let t = CryptTarget::new(
            CryptCipher::AesXtsPlain64,
            hex_key(64),
            "/dev/loop1".into(),
            0,
            4096,
        )
        .unwrap();
        let hex: String = (0..64u8).map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            t.params().as_str(),
            format!(
                "aes-xts-plain64 {hex} 0 /dev/loop1 0 3 sector_size:4096 no_read_workqueue no_write_workqueue"
            )
        );
        let t = CryptTarget {
            no_read_workqueue: false,
            no_write_workqueue: false,
            ..t
        };
        assert_eq!(
            t.params().as_str(),
            format!("aes-xts-plain64 {hex} 0 /dev/loop1 0 1 sector_size:4096")
        );
        let t = CryptTarget {
            sector_size: 512,
            ..t
        };
        assert_eq!(
            t.params().as_str(),
            format!("aes-xts-plain64 {hex} 0 /dev/loop1 0")
        );
    }

    #[test]
    fn crypt_parses_kernel_readback() {
        let k = "capi:authenc(hmac(sha256),xts(aes))-random :96:logon:sealcsi:vol1 0 253:0 0 4 \
                 no_read_workqueue no_write_workqueue integrity:48:aead sector_size:4096";
        let t = CryptTarget::parse(k).unwrap();
        let want = authenc(CryptKey::Keyring {
            description: "sealcsi:vol1".into(),
        });
        assert_eq!(
            t,
            CryptTarget {
                device: "253:0".into(),
                ..want
            }
        );
    }

    #[test]
    fn crypt_refuses_what_the_kernel_silently_accepts() {
        // 64-byte key for authenc: the kernel makes it AES-128-XTS.
        let e = CryptTarget::new(
            CryptCipher::AuthencHmacSha256XtsPlainRandom,
            hex_key(64),
            "/d".into(),
            0,
            4096,
        );
        assert!(matches!(e, Err(TableError::Inconsistent { .. })), "{e:?}");
        let mut t = authenc(hex_key(96));
        t.key_len = 64;
        assert!(t.validate().is_err());
        // Truncated HMAC tags.
        for tag in [Some(28), Some(32), None] {
            let t = CryptTarget {
                integrity_tag_size: tag,
                ..authenc(hex_key(96))
            };
            assert!(t.validate().is_err(), "tag {tag:?}");
        }
        let x = CryptTarget::new(
            CryptCipher::AesXtsPlain64,
            hex_key(64),
            "/d".into(),
            0,
            4096,
        )
        .unwrap();
        assert!(
            CryptTarget {
                integrity_tag_size: Some(48),
                ..x.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            CryptTarget {
                sector_size: 8192,
                ..x.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            CryptTarget {
                sector_size: 768,
                ..x.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            CryptTarget {
                device: "/dev/a b".into(),
                ..x
            }
            .validate()
            .is_err()
        );
        // Same through the parser.
        let hex64 = "00".repeat(64);
        let p = format!(
            "capi:authenc(hmac(sha256),xts(aes))-random {hex64} 0 /d 0 2 integrity:48:aead sector_size:4096"
        );
        assert!(CryptTarget::parse(&p).is_err());
    }

    #[test]
    fn crypt_parse_rejects() {
        let hex = "ab".repeat(64);
        for bad in [
            format!("aes-xts-plain64 {hex} 0 /d 0 2 sector_size:4096"),
            format!("aes-xts-plain64 {hex} 0 /d 0 0 sector_size:4096"),
            format!("aes-xts-plain64 {hex} 0 /d 0 1 allow_discards"),
            format!("aes-xts-plain64 {hex} 0 /d 0 1 iv_large_sectors"),
            format!("aes-xts-plain64 {hex} 0 /d 0 2 sector_size:4096 sector_size:4096"),
            format!("aes-xts-plain64 {hex} 0 /d 0 2 no_read_workqueue no_read_workqueue"),
            format!("aes-xts-plain64 {hex} 0 /d 0 1 sector_size:16384"),
            format!("aes-xts-plain64 {hex} 0 /d"),
            format!("aes-cbc-essiv:sha256 {hex} 0 /d 0"),
            format!("aes-xts-plain64 {}x 0 /d 0", &hex[1..]),
            format!("aes-xts-plain64 {}0 0 /d 0", &hex),
            "aes-xts-plain64 - 0 /d 0".to_owned(),
            "aes-xts-plain64 :64:user:sealcsi:a 0 /d 0".to_owned(),
            "aes-xts-plain64 :64:logon:nocolon 0 /d 0".to_owned(),
            "aes-xts-plain64 :64:logon::a 0 /d 0".to_owned(),
            "capi:authenc(hmac(sha256),xts(aes))-random :96:logon:s:a 0 /d 0 1 integrity:48:none"
                .to_owned(),
        ] {
            assert!(CryptTarget::parse(&bad).is_err(), "accepted {}", bad.len());
        }
    }

    #[test]
    fn errors_and_debug_never_show_the_key() {
        let key_hex = "5a".repeat(96);
        let t = authenc(CryptKey::Hex(Zeroizing::new(vec![0x5a; 96])));
        let dbg = format!("{t:?} {:?}", Target::Crypt(t.clone()));
        assert!(!dbg.contains("5a5a"), "{dbg}");
        assert!(!dbg.contains("90, 90"), "{dbg}");
        for bad in [
            format!("aes-xts-plain64 {key_hex} 0 /d 0"), // wrong length
            format!("aes-xts-plain64 {} 0 /d 0 1 {key_hex}", &key_hex[..128]), // key as option
            format!("{key_hex} {key_hex} 0 /d 0"),       // key as cipher
            format!("aes-xts-plain64 {}5 0 /d 0", &key_hex[..126]), // odd length
        ] {
            let e = CryptTarget::parse(&bad).unwrap_err().to_string();
            assert!(!e.contains("5a5a"), "{e}");
        }
    }

    #[test]
    fn table_validation() {
        let line = |start, length| TargetLine {
            start,
            length,
            target: Target::Integrity(integrity()),
        };
        assert!(validate_table(&[line(0, 8)]).is_ok());
        assert!(validate_table(&[line(0, 8), line(8, 8)]).is_ok());
        assert!(validate_table(&[]).is_err());
        assert!(validate_table(&[line(1, 8)]).is_err());
        assert!(validate_table(&[line(0, 0)]).is_err());
        assert!(validate_table(&[line(0, 8), line(9, 8)]).is_err());
        assert!(validate_table(&[line(0, u64::MAX), line(u64::MAX, 8)]).is_err());
        let raw = line(0, 8).to_raw();
        assert_eq!(
            TargetLine::from_raw(raw.0, raw.1, raw.2, &raw.3).unwrap(),
            line(0, 8)
        );
        assert!(TargetLine::from_raw(0, 8, "linear", "/dev/x 0").is_err());
    }

    fn arb_device() -> impl Strategy<Value = PathBuf> {
        prop_oneof![
            "/dev/[a-z0-9/._-]{1,30}".prop_map(PathBuf::from),
            (0u32..300, 0u32..5000).prop_map(|(a, b)| PathBuf::from(format!("{a}:{b}")))
        ]
    }

    fn arb_block() -> impl Strategy<Value = u32> {
        prop_oneof![Just(512u32), Just(1024), Just(2048), Just(4096)]
    }

    fn arb_integrity() -> impl Strategy<Value = IntegrityTarget> {
        (
            arb_device(),
            any::<u64>(),
            1u32..=255,
            any::<bool>(),
            arb_block(),
            any::<bool>(),
        )
            .prop_map(
                |(device, offset_sectors, tag_size, j, block_size, fix_padding)| IntegrityTarget {
                    device,
                    offset_sectors,
                    tag_size,
                    mode: if j {
                        JournalMode::Journal
                    } else {
                        JournalMode::Direct
                    },
                    block_size,
                    fix_padding,
                    journal_sectors: None,
                },
            )
    }

    fn arb_crypt() -> impl Strategy<Value = CryptTarget> {
        let cipher = prop_oneof![
            Just(CryptCipher::AuthencHmacSha256XtsPlainRandom),
            Just(CryptCipher::AesXtsPlain64)
        ];
        (
            cipher,
            any::<bool>(),
            any::<[u8; 32]>(),
            "[a-z]{1,8}:[A-Za-z0-9:._-]{1,40}",
            any::<u64>(),
            arb_device(),
            any::<u64>(),
            arb_block(),
            any::<(bool, bool)>(),
        )
            .prop_map(
                |(
                    cipher,
                    keyring,
                    seed,
                    desc,
                    iv_offset,
                    device,
                    offset_sectors,
                    sector_size,
                    (r, w),
                )| {
                    let key = if keyring {
                        CryptKey::Keyring { description: desc }
                    } else {
                        CryptKey::Hex(Zeroizing::new(
                            seed.iter()
                                .cycle()
                                .take(cipher.key_len())
                                .copied()
                                .collect(),
                        ))
                    };
                    CryptTarget {
                        cipher,
                        key,
                        key_len: cipher.key_len(),
                        iv_offset,
                        device,
                        offset_sectors,
                        integrity_tag_size: cipher.integrity_tag_size(),
                        sector_size,
                        no_read_workqueue: r,
                        no_write_workqueue: w,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn integrity_round_trip(t in arb_integrity()) {
            prop_assert!(t.validate().is_ok());
            prop_assert_eq!(IntegrityTarget::parse(&t.params()).unwrap(), t);
        }

        #[test]
        fn crypt_round_trip(t in arb_crypt()) {
            prop_assert!(t.validate().is_ok());
            prop_assert_eq!(CryptTarget::parse(&t.params()).unwrap(), t);
        }

        #[test]
        fn target_round_trip(t in prop_oneof![arb_integrity().prop_map(Target::Integrity), arb_crypt().prop_map(Target::Crypt)]) {
            prop_assert_eq!(Target::parse(t.target_type(), &t.params()).unwrap(), t);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = IntegrityTarget::parse(&s);
            let _ = CryptTarget::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_tables(
            words in proptest::collection::vec(prop_oneof![
                Just("J".to_owned()), Just("D".to_owned()), Just("fix_padding".to_owned()),
                Just("integrity:48:aead".to_owned()), Just(":96:logon:a:b".to_owned()),
                Just("capi:authenc(hmac(sha256),xts(aes))-random".to_owned()), Just("aes-xts-plain64".to_owned()),
                "[0-9]{1,25}", "[0-9a-f]{0,200}", "[a-z_]{1,12}:[0-9]{1,6}", "[ -~]{0,12}",
            ], 0..14)
        ) {
            let s = words.join(" ");
            let _ = IntegrityTarget::parse(&s);
            let _ = CryptTarget::parse(&s);
        }

        #[test]
        fn wrong_option_count_is_refused(t in arb_integrity(), delta in 1usize..3, up in any::<bool>()) {
            let p = t.params();
            let mut tokens: Vec<String> = p.split(' ').map(str::to_owned).collect();
            let n: usize = tokens[4].parse().unwrap();
            let wrong = if up { n + delta } else { n.saturating_sub(delta) };
            prop_assume!(wrong != n);
            tokens[4] = wrong.to_string();
            prop_assert!(IntegrityTarget::parse(&tokens.join(" ")).is_err());
        }
    }
}
