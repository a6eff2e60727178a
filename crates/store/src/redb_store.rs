//! redb store (stub)
