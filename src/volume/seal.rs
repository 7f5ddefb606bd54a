//! The one keyslot wrap and the one keyslot unwrap of a sealed slot (kind 1), and the search for the
//! slot this node opens. Every caller (format, open, keyslot changes, recovery) goes through here.

use crate::clock::now_unix;
use crate::header::{Header, Keyslot, SlotKind, SourceKind};
use crate::keys::{Kek, KeyError, NONCE_LEN, SALT_LEN, SealingSecret, VolumeKey, WRAP_TAG_LEN};
use crate::sealing::{SealError, SealingSource};

use super::VolumeError;

/// Wraps `key` for `secret` into a new sealed keyslot of `header` (fresh salt and nonce; every slot
/// field, the header's mapping fields and its UUID authenticated).
pub fn seal_slot(
    header: &Header,
    key: &VolumeKey,
    source: SourceKind,
    binding: Vec<u8>,
    secret: &SealingSecret,
) -> Result<Keyslot, KeyError> {
    let mut slot = Keyslot {
        kind: SlotKind::Sealed(source),
        created: now_unix(),
        identity_digest: secret.digest(),
        salt: [0; SALT_LEN],
        nonce: [0; NONCE_LEN],
        binding,
        wrapped: vec![0; key.len() + WRAP_TAG_LEN],
    };
    crate::keys::random_bytes(&mut slot.salt)?;
    crate::keys::random_bytes(&mut slot.nonce)?;
    let kek = Kek::derive(secret, &slot.salt, &header.uuid, &slot.identity_digest);
    slot.wrapped = kek.wrap(&slot.nonce, &header.keyslot_aad(&slot), key);
    Ok(slot)
}

/// Unwraps a sealed slot with `secret` (the caller matched the identity digest). A key of the wrong
/// length for the header's profile does not authenticate either.
pub fn unwrap_slot(
    header: &Header,
    slot: &Keyslot,
    secret: &SealingSecret,
) -> Result<VolumeKey, KeyError> {
    let kek = Kek::derive(secret, &slot.salt, &header.uuid, &slot.identity_digest);
    let key = kek.unwrap(&slot.nonce, &header.keyslot_aad(slot), &slot.wrapped)?;
    if key.len() != header.profile.key_len() {
        return Err(KeyError::Unwrap);
    }
    Ok(key)
}

/// Wraps `key` for `source`'s identity with its default binding.
pub fn seal_for(
    source: &dyn SealingSource,
    header: &Header,
    key: &VolumeKey,
) -> Result<Keyslot, VolumeError> {
    let binding = source.default_binding();
    let secret = source.secret(&binding)?;
    Ok(seal_slot(header, key, source.kind(), binding, &secret)?)
}

/// Finds a keyslot sealed to `source` and unwraps the volume key. Tells "no slot for this identity"
/// (a different node or image) from "my slot fails to authenticate" (the header was altered).
pub fn unseal_with(
    source: &dyn SealingSource,
    header: &Header,
) -> Result<(usize, VolumeKey), VolumeError> {
    let mut active = 0;
    let mut failed = Vec::new();
    for (index, slot) in header.active_slots() {
        active += 1;
        // Slots of other sources, and recovery (escrow) slots, are for someone else.
        if slot.kind != SlotKind::Sealed(source.kind()) {
            continue;
        }
        let secret = match source.secret(&slot.binding) {
            Ok(secret) => secret,
            // A binding this node cannot satisfy is a slot for someone else.
            Err(SealError::Binding { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if secret.digest() != slot.identity_digest {
            continue;
        }
        match unwrap_slot(header, slot, &secret) {
            Ok(key) => return Ok((index, key)),
            Err(_) => failed.push(index),
        }
    }
    if active == 0 {
        return Err(VolumeError::NoKeyslots);
    }
    if !failed.is_empty() {
        return Err(VolumeError::HeaderAuthentication { slots: failed });
    }
    let identity = crate::sealing::identity(source)?;
    Err(VolumeError::WrongIdentity {
        kind: identity.kind,
        digest: identity.digest,
        slots: active,
    })
}
