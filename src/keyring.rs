//! Kernel keyring.
