//! A private PostgreSQL cluster on loopback (filled in by the PostgreSQL store work).
