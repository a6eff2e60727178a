//! The [`twinhub_store::Store`] trait on PostgreSQL (being built).
