//! conformance (stub)
