//! The test kit: one way to start a Dropline server, a local cluster or a courier, for the
//! services tests, the demo (`dropline demo`, and its cluster mode) and the load tests.
//!
//! - [`TestServer`]: a real server in this process, on 127.0.0.1:0 over a data directory
//!   (temporary unless one is given).
//! - [`ServeProcess`]: the real `dropline serve` as a child process, for tests that kill -9
//!   it or send it SIGTERM.
//! - [`LocalCluster`]: NATS JetStream servers and `dropline serve --nats` nodes on loopback,
//!   and the partition leases they hold.
//! - [`nats`]: the local NATS servers and the loopback ports servers are started on.
//! - [`disk`]: a small tmpfs a test can fill (`Tmpfs`, `fill`), for disk-full tests.
//! - [`fixtures`]: gRPC clients with the test credentials, hubs, couriers, drops and
//!   requests that tests share.
//!
//! `use testkit::*` brings the fixtures, the servers and the cluster in.

pub mod cluster;
pub mod disk;
pub mod fixtures;
pub mod nats;
pub mod nemesis;
pub mod process;
pub mod server;

pub use cluster::{ClusterOptions, LocalCluster};
pub use fixtures::*;
pub use process::{dropline_exe, EdgeCommand, ServeCommand, ServeProcess};
pub use server::TestServer;
