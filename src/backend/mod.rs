//! Storage backends.
