//! In-memory store (stub)
