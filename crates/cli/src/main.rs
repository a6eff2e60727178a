//! twinhub binary (stub)
fn main() {}
