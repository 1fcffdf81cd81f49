//! Cluster mode: the same actors spread over several nodes. Actor keys hash to a fixed
//! number of partitions ([`placement`]); nodes hold partitions by leases in a JetStream
//! key-value bucket ([`leases`]); commands travel to the owning node as NATS request/reply
//! ([`node`]); journals are JetStream subjects appended with a sequence check that fences a
//! stale owner ([`journal`]).

pub mod journal;
pub mod leases;
pub mod node;
pub mod placement;

pub use leases::LeaseTimings;
pub use node::{ClusterConfig, ClusterNode};
