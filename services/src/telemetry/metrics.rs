//! The server's Prometheus metrics: what the gRPC layer and checkout count on the hot path
//! ([`Metrics`]: arrays of atomics indexed by method and status code, fixed-bucket
//! histograms, nothing allocated or locked per call), and [`render`], which reads those
//! and everything the platform keeps anyway (projections, the journal's and the actors'
//! figures, the cluster node's) into the Prometheus text format when `/metrics` is scraped.
//!
//! Every name starts with `dropline_` and is in base units (`_seconds`, `_bytes`), counters
//! ending in `_total`. Labels have bounded values: gRPC methods come from the served protos
//! (an unknown path is `unknown`), status codes are the 17 of gRPC, hubs are operator-made;
//! never an order, buyer or credential.

use crate::platform::Platform;
use actors::telemetry::{Histogram, HistogramSnapshot, SlaDeadline, SwapKind};
use domain::sku::ReserveOutcome;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The gRPC status codes by number, as labels.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];
pub const CODE_CANCELLED: usize = 1;
pub const CODE_UNKNOWN: usize = 2;

/// Services served besides Dropline's own protos, whose descriptors are not in them.
const OTHER_METHODS: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Reserve outcomes, as labels: the four a reservation answers with, then `refused` (a
/// rejection, a call-rate bound, overload: no reservation).
pub const RESERVE_OUTCOMES: [&str; 5] = ["held", "partial", "waitlisted", "sold_out", "refused"];

/// One gRPC method's counters.
#[derive(Debug)]
struct Method {
    service: String,
    name: String,
    /// `service/name`, the span's name in traces.
    path: String,
    codes: [AtomicU64; 17],
    latency_us: Histogram,
}

/// FNV-1a: a method path is hashed once per call; SipHash's flooding resistance buys
/// nothing for a table nobody can add to.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the hot path counts.
#[derive(Debug)]
pub struct Metrics {
    enabled: bool,
    methods: Vec<Method>,
    /// By path (`/package.Service/Method`); a path not in it counts as the last method,
    /// `unknown`. Fixed once made, so a cheap hash does (no client can add a key).
    index: HashMap<String, usize, BuildHasherDefault<Fnv>>,
    reserves: [AtomicU64; 5],
    audit: Mutex<Option<AuditResult>>,
}

/// The last oversell audit's result (see [`Platform::audit_drop`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditResult {
    pub runs: u64,
    /// When it ran (Unix seconds).
    pub at_unix_seconds: u64,
    pub skus: u64,
    /// Units sold or held beyond an allocation, summed over the audited SKUs.
    pub oversold_units: u64,
    /// SKUs whose invariants failed when rebuilt from their journals.
    pub invariant_failures: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

impl Metrics {
    /// Counters for every method of the served protos (`enabled: false`: nothing is counted,
    /// for the instrumentation-off benchmark).
    pub fn new(enabled: bool) -> Metrics {
        let mut paths: Vec<(String, String)> = Vec::new();
        for set in [proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("the built-in descriptor sets decode");
            for file in set.file {
                let package = file.package().to_string();
                for service in file.service {
                    let service_name = format!("{package}.{}", service.name());
                    for method in service.method {
                        paths.push((service_name.clone(), method.name().to_string()));
                    }
                }
            }
        }
        for path in OTHER_METHODS {
            let (service, method) = path[1..].split_once('/').expect("a method path");
            paths.push((service.into(), method.into()));
        }
        paths.push(("unknown".into(), "unknown".into()));
        let index = paths
            .iter()
            .enumerate()
            .map(|(i, (service, method))| (format!("/{service}/{method}"), i))
            .collect();
        let methods = paths
            .into_iter()
            .map(|(service, name)| Method {
                path: format!("{service}/{name}"),
                service,
                name,
                codes: Default::default(),
                latency_us: Histogram::latency(),
            })
            .collect();
        Metrics {
            enabled,
            methods,
            index,
            reserves: Default::default(),
            audit: Mutex::new(None),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The index of the method at `path`, for [`Metrics::rpc_finished`].
    pub fn method(&self, path: &str) -> usize {
        self.index.get(path).copied().unwrap_or(self.methods.len() - 1)
    }

    /// `service/method` of a method index.
    pub fn method_path(&self, method: usize) -> &str {
        &self.methods[method].path
    }

    /// A call of `method` ended with status `code` (its number) after `elapsed`.
    pub fn rpc_finished(&self, method: usize, code: usize, elapsed: Duration) {
        let m = &self.methods[method];
        m.codes[code.min(16)].fetch_add(1, Ordering::Relaxed);
        m.latency_us.observe_duration(elapsed);
    }

    /// A reserve was answered with `outcome`, or refused (`None`).
    pub fn reserve(&self, outcome: Option<ReserveOutcome>) {
        if !self.enabled {
            return;
        }
        let i = match outcome {
            Some(ReserveOutcome::Held) => 0,
            Some(ReserveOutcome::Partial) => 1,
            Some(ReserveOutcome::Waitlisted) => 2,
            Some(ReserveOutcome::SoldOut) => 3,
            None => 4,
        };
        self.reserves[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Reserves so far by outcome, in the order of [`RESERVE_OUTCOMES`].
    pub fn reserves(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.reserves[i].load(Ordering::Relaxed))
    }

    /// Records an oversell audit's result.
    pub fn audited(&self, skus: u64, oversold_units: u64, invariant_failures: u64, at_unix_seconds: u64) {
        let mut audit = self.audit.lock().expect("audit lock");
        let runs = audit.as_ref().map_or(0, |a| a.runs) + 1;
        *audit = Some(AuditResult {
            runs,
            at_unix_seconds,
            skus,
            oversold_units,
            invariant_failures,
        });
    }

    pub fn last_audit(&self) -> Option<AuditResult> {
        self.audit.lock().expect("audit lock").clone()
    }
}

/// The platform's metrics in the Prometheus text format (version 0.0.4).
pub fn render(platform: &Platform) -> String {
    let mut registry = Registry::with_prefix("dropline");
    registry.register_collector(Box::new(PlatformCollector(platform.clone())));
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

struct PlatformCollector(Platform);

impl std::fmt::Debug for PlatformCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformCollector")
    }
}

/// A family of one metric type, its samples added one label set at a time.
struct Family<'a> {
    encoder: MetricEncoder<'a>,
}

impl<'a> Family<'a> {
    fn new(
        encoder: &'a mut DescriptorEncoder,
        name: &'a str,
        help: &str,
        unit: Option<&'a Unit>,
        metric_type: MetricType,
    ) -> Result<Family<'a>, std::fmt::Error> {
        Ok(Family {
            encoder: encoder.encode_descriptor(name, help, unit, metric_type)?,
        })
    }

    fn counter(&mut self, labels: &[(&str, &str)], value: u64) -> Result<(), std::fmt::Error> {
        self.encoder
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None)
    }

    fn gauge(&mut self, labels: &[(&str, &str)], value: i64) -> Result<(), std::fmt::Error> {
        self.encoder.encode_family(&labels)?.encode_gauge(&value)
    }

    /// A histogram whose observations are in `scale` units (1e-6: microseconds → seconds).
    fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        snapshot: &HistogramSnapshot,
        scale: f64,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = snapshot
            .buckets
            .iter()
            .map(|&(bound, count)| {
                let bound = if bound == u64::MAX {
                    f64::INFINITY
                } else {
                    bound as f64 * scale
                };
                (bound, count)
            })
            .collect();
        self.encoder.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            snapshot.sum as f64 * scale,
            snapshot.count,
            &buckets,
            None,
        )
    }
}

const MICROS: f64 = 1e-6;

impl Collector for PlatformCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let platform = &self.0;
        let metrics = &platform.metrics;
        let seconds = Unit::Seconds;
        let bytes = Unit::Bytes;

        let info = prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        info.encode(encoder.encode_descriptor(
            "build",
            "The running Dropline's version.",
            None,
            info.metric_type(),
        )?)?;

        // gRPC, per method that was called.
        let called: Vec<&Method> = metrics
            .methods
            .iter()
            .filter(|m| m.codes.iter().any(|c| c.load(Ordering::Relaxed) > 0))
            .collect();
        {
            let mut family = Family::new(
                &mut encoder,
                "grpc_server_handled",
                "gRPC calls finished, by method and status code (a call the client abandoned is CANCELLED).",
                None,
                MetricType::Counter,
            )?;
            for m in &called {
                for (code, count) in m.codes.iter().enumerate() {
                    let count = count.load(Ordering::Relaxed);
                    if count > 0 {
                        family.counter(
                            &[("service", &m.service), ("method", &m.name), ("code", GRPC_CODES[code])],
                            count,
                        )?;
                    }
                }
            }
        }
        {
            let mut family = Family::new(
                &mut encoder,
                "grpc_server_handling",
                "Time from a gRPC call's arrival to its status (a stream's: its end).",
                Some(&seconds),
                MetricType::Histogram,
            )?;
            for m in &called {
                family.histogram(
                    &[("service", &m.service), ("method", &m.name)],
                    &m.latency_us.snapshot(),
                    MICROS,
                )?;
            }
        }

        // Checkout.
        {
            let mut family = Family::new(
                &mut encoder,
                "reserves",
                "Reserves answered (Reserve and each of ReserveStream), by outcome; refused: no reservation (rejected, rate-bounded, overloaded).",
                None,
                MetricType::Counter,
            )?;
            for (outcome, count) in RESERVE_OUTCOMES.iter().zip(metrics.reserves()) {
                family.counter(&[("outcome", outcome)], count)?;
            }
        }

        // Stock, from this node's availability projection.
        let hubs = platform.projections.availability.totals_by_hub();
        {
            let mut family = Family::new(
                &mut encoder,
                "stock_units",
                "Units of stock per hub and state, summed over the drops this node's projections know.",
                None,
                MetricType::Gauge,
            )?;
            for (hub, totals) in &hubs {
                for (state, units) in [
                    ("allocated", totals.allocated),
                    ("available", totals.available),
                    ("held", totals.held),
                    ("sold", totals.sold),
                ] {
                    family.gauge(&[("hub", hub.as_str()), ("state", state)], units as i64)?;
                }
            }
        }
        {
            let mut family = Family::new(
                &mut encoder,
                "waitlisted_units",
                "Units buyers wait for, per hub (a city's waitlist counts at its first hub).",
                None,
                MetricType::Gauge,
            )?;
            for (hub, totals) in &hubs {
                family.gauge(&[("hub", hub.as_str())], totals.waitlisted as i64)?;
            }
        }

        // The oversell audit, once one ran.
        if let Some(audit) = metrics.last_audit() {
            for (name, help, value) in [
                (
                    "audit_oversold_units",
                    "Units sold or held beyond their allocation in the last oversell audit (0 unless something is badly wrong).",
                    audit.oversold_units,
                ),
                (
                    "audit_invariant_failures",
                    "SKUs whose invariants failed when the last oversell audit rebuilt them from their journals.",
                    audit.invariant_failures,
                ),
                ("audit_skus", "SKUs the last oversell audit checked.", audit.skus),
                (
                    "audit_last_run_timestamp_seconds",
                    "When the last oversell audit ran (Unix time).",
                    audit.at_unix_seconds,
                ),
            ] {
                Family::new(&mut encoder, name, help, None, MetricType::Gauge)?.gauge(&[], value as i64)?;
            }
            Family::new(
                &mut encoder,
                "audits",
                "Oversell audits run.",
                None,
                MetricType::Counter,
            )?
            .counter(&[], audit.runs)?;
        }

        // The journal.
        if let Some(journal) = platform.journal.figures() {
            let labels = [("journal", journal.kind)];
            Family::new(
                &mut encoder,
                "journal_appends_per_write",
                "Appends (one actor's batch each) made durable by one write: a group commit of the log, one JetStream message.",
                None,
                MetricType::Histogram,
            )?
            .histogram(&labels, &journal.appends_per_write, 1.0)?;
            Family::new(
                &mut encoder,
                "journal_write",
                "Time to make one write durable: the log record written and fdatasync'ed (embedded), a JetStream append until acknowledged (cluster).",
                Some(&seconds),
                MetricType::Histogram,
            )?
            .histogram(&labels, &journal.write_latency_us, MICROS)?;
            Family::new(
                &mut encoder,
                "journal_queue_depth",
                "Appends waiting for the journal's writer.",
                None,
                MetricType::Gauge,
            )?
            .gauge(&labels, journal.queue_depth as i64)?;
            Family::new(
                &mut encoder,
                "journal_queue_capacity",
                "Appends the journal's queue holds at most (RESOURCE_EXHAUSTED beyond).",
                None,
                MetricType::Gauge,
            )?
            .gauge(&labels, journal.queue_capacity as i64)?;
            if let Some(syncs) = journal.syncs {
                Family::new(
                    &mut encoder,
                    "journal_syncs",
                    "fdatasync calls of the write-ahead log.",
                    None,
                    MetricType::Counter,
                )?
                .counter(&labels, syncs)?;
            }
            if let Some(written) = journal.bytes_written {
                Family::new(
                    &mut encoder,
                    "journal_written",
                    "Bytes written to the write-ahead log.",
                    Some(&bytes),
                    MetricType::Counter,
                )?
                .counter(&labels, written)?;
            }
        }

        // Actors of this process.
        let kinds = platform.actors.figures();
        for (name, help, value) in [
            (
                "actors_running",
                "Running actors, by kind.",
                (|k: &actors::telemetry::KindFigures| k.running) as fn(&actors::telemetry::KindFigures) -> u64,
            ),
            (
                "actor_mailbox_queued",
                "Commands waiting in the mailboxes of the running actors, by kind.",
                |k| k.queued,
            ),
            (
                "actor_mailbox_queued_max",
                "Commands waiting in the fullest mailbox, by kind.",
                |k| k.queued_max,
            ),
        ] {
            let mut family = Family::new(&mut encoder, name, help, None, MetricType::Gauge)?;
            for kind in &kinds {
                family.gauge(&[("kind", kind.kind)], value(kind) as i64)?;
            }
        }

        // Hubs whose actors ran here.
        let hub_counts = platform.actors.stats().hubs();
        {
            let mut family = Family::new(
                &mut encoder,
                "hub_swaps",
                "Dispatches moved to another partner, by hub and reason (counted where the hub's actor runs).",
                None,
                MetricType::Counter,
            )?;
            for (hub, counts) in &hub_counts {
                for kind in SwapKind::ALL {
                    family.counter(
                        &[("hub", hub.as_str()), ("reason", kind.label())],
                        counts.swaps[kind as usize],
                    )?;
                }
            }
        }
        {
            let mut family = Family::new(
                &mut encoder,
                "hub_sla_misses",
                "Partner SLA deadlines missed, by hub and deadline.",
                None,
                MetricType::Counter,
            )?;
            for (hub, counts) in &hub_counts {
                for deadline in SlaDeadline::ALL {
                    family.counter(
                        &[("hub", hub.as_str()), ("deadline", deadline.label())],
                        counts.sla_misses[deadline as usize],
                    )?;
                }
            }
        }
        {
            let mut family = Family::new(
                &mut encoder,
                "hub_window_misses",
                "Buyers' delivery windows missed (a remedy booked), by hub.",
                None,
                MetricType::Counter,
            )?;
            for (hub, counts) in &hub_counts {
                family.counter(&[("hub", hub.as_str())], counts.window_misses)?;
            }
        }

        // A cluster node.
        if let Some(node) = &platform.cluster {
            let stats = node.stats();
            Family::new(
                &mut encoder,
                "cluster_partitions_owned",
                "Partitions this node holds a lease on.",
                None,
                MetricType::Gauge,
            )?
            .gauge(&[], node.owned_count() as i64)?;
            Family::new(
                &mut encoder,
                "cluster_connected",
                "1 while this node's NATS connection is up.",
                None,
                MetricType::Gauge,
            )?
            .gauge(&[], i64::from(node.connected()))?;
            let mut family = Family::new(
                &mut encoder,
                "cluster_lease_changes",
                "Partitions this node acquired or released (released includes leases lost).",
                None,
                MetricType::Counter,
            )?;
            family.counter(
                &[("change", "acquired")],
                stats.partitions_acquired.load(Ordering::Relaxed),
            )?;
            family.counter(
                &[("change", "released")],
                stats.partitions_released.load(Ordering::Relaxed),
            )?;
            Family::new(
                &mut encoder,
                "cluster_nats_request",
                "Commands sent to their owner node by NATS request, until the reply.",
                Some(&seconds),
                MetricType::Histogram,
            )?
            .histogram(&[], &stats.request_latency_us.snapshot(), MICROS)?;
            Family::new(
                &mut encoder,
                "cluster_projection_lag",
                "Time from another node's projection update being stored in JetStream to its applying here.",
                Some(&seconds),
                MetricType::Histogram,
            )?
            .histogram(&[], &stats.projection_lag_us.snapshot(), MICROS)?;
            Family::new(
                &mut encoder,
                "cluster_projection_pending",
                "Projection updates still to be delivered to this node, at its last update.",
                None,
                MetricType::Gauge,
            )?
            .gauge(&[], stats.projection_pending.load(Ordering::Relaxed) as i64)?;
        }
        Ok(())
    }
}

/// Reads back a [`render`]ed text: each sample's name with its labels (`name{a="x",b="y"}`,
/// labels as rendered) → value. For tests and tools; comments are skipped.
pub fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}
