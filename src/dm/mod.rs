//! Device-mapper mappings.
