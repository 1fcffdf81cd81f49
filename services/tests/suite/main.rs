//! The services' integration tests, one binary: each module was a test file of its own; they
//! share the test kit (`testkit`: servers in process and as `dropline serve` processes, a
//! local cluster, gRPC fixtures).

mod adversary;
mod browser;
mod checkout;
mod cluster;
mod console;
mod dispatch;
mod edge;
mod hygiene;
mod lifecycle;
mod list_drops;
mod nemesis;
mod popup;
mod reserve_stream;
mod restart;
mod settlement;
mod storage_faults;
mod telemetry;
mod tls;
