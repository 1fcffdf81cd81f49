//! The nemesis, CI-sized: a few fault schedules against a real 3-node cluster on 3 NATS
//! servers (R3), each checked for lost acknowledgements, oversell, double bookings and double
//! deliveries (testkit::nemesis). `DROPLINE_NEMESIS_SCHEDULES` and `DROPLINE_NEMESIS_SEED`
//! run others; long runs: `dropline-load nemesis --schedules N --seed S`.

use testkit::nemesis::{run, NemesisOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_schedules_lose_no_acknowledged_operation() {
    let _one_at_a_time = crate::cluster::ONE_AT_A_TIME.lock().await;
    let schedules: u64 = std::env::var("DROPLINE_NEMESIS_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let first: u64 = std::env::var("DROPLINE_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut violations = Vec::new();
    for seed in first..first + schedules {
        let dir = tempfile::tempdir().unwrap();
        let report = match run(&NemesisOptions::new(seed), dir.path()).await {
            Ok(report) => report,
            Err(e) => panic!("schedule {seed}: {e:#} (logs in {})", dir.keep().display()),
        };
        println!("{}", report.line());
        assert!(
            report.verdict.acknowledged > 50,
            "too little was checked: {}",
            report.line()
        );
        if !report.verdict.violations.is_empty() {
            for v in &report.verdict.violations {
                println!("  violation: {v}");
            }
            violations.push((seed, report.verdict.violations.clone(), dir.keep()));
        }
    }
    assert!(violations.is_empty(), "{violations:#?}");
}
