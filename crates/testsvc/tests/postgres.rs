//! The private PostgreSQL cluster itself: databases are isolated and dropped with their guard,
//! the server stops and restarts on its port keeping its data, and dropping the handle stops it
//! and removes its directory.

use twinhub_testsvc::postgres::{self, PgServer};

#[test]
fn shared_cluster_gives_each_case_its_own_database() {
    let server = postgres::shared();
    let a = server.fresh_database();
    let b = server.fresh_database();
    assert_ne!(a.name(), b.name());
    assert!(a.url().starts_with("postgres://postgres@127.0.0.1:"));
    server.execute(a.name(), "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    assert_eq!(
        server.execute(a.name(), "SELECT count(*) FROM t").trim(),
        "1"
    );
    // The other database does not see the table.
    assert_eq!(
        server
            .execute(
                b.name(),
                "SELECT count(*) FROM pg_tables WHERE tablename = 't'"
            )
            .trim(),
        "0"
    );
    assert_eq!(server.execute("postgres", "SHOW fsync").trim(), "on");
    assert_eq!(
        server.execute("postgres", "SHOW listen_addresses").trim(),
        "127.0.0.1"
    );

    let name = a.name().to_owned();
    drop(a);
    let left = server.execute(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    );
    assert_eq!(left.trim(), "0", "the database outlived its guard");
}

#[test]
fn private_server_restarts_and_cleans_up() {
    let server = PgServer::start();
    let port = server.port();
    let db = server.fresh_database();
    server.execute(
        db.name(),
        "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)",
    );
    server.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server still accepts connections after stop"
    );
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.execute(db.name(), "SELECT x FROM kept").trim(), "7");

    let dir = format!("{server:?}");
    drop(db);
    drop(server);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server outlived its handle ({dir})"
    );
}
