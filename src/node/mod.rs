//! The node core (being written).
