//! `dropline-load nemesis`: many fault schedules against a real cluster (3 nodes on 3
//! JetStream servers, R3), each on a fresh cluster and checked by the test kit's checker
//! (testkit::nemesis). One line per schedule and a closing summary; a schedule with a
//! violation keeps its directory (node and NATS logs, stores) and fails the run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::nemesis::{run as run_schedule, NemesisOptions};

#[derive(Debug, clap::Args)]
pub struct NemesisArgs {
    /// The `dropline` binary the nodes run.
    #[arg(long)]
    pub dropline_bin: PathBuf,
    /// Schedules to run; schedule i uses seed S + i.
    #[arg(long, default_value_t = 100)]
    pub schedules: u64,
    /// The first schedule's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Faults per schedule.
    #[arg(long, default_value_t = 4)]
    pub faults: usize,
    /// Concurrent buyers.
    #[arg(long, default_value_t = 6)]
    pub buyers: usize,
    /// Where to keep the directories of failed schedules [default: the system's temp dir].
    #[arg(long)]
    pub keep_dir: Option<PathBuf>,
    /// Go on after a failed schedule (the run still fails at the end).
    #[arg(long)]
    pub keep_going: bool,
}

pub async fn run(args: NemesisArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (mut acknowledged, mut indeterminate, mut faults, mut violations) = (0u64, 0u64, 0usize, 0usize);
    let mut recovered = Vec::new();
    let mut failed = Vec::new();
    for seed in args.seed..args.seed + args.schedules {
        let prefix = format!("dropline-nemesis-{seed}-");
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        let dir = match &args.keep_dir {
            Some(base) => {
                std::fs::create_dir_all(base)?;
                builder.tempdir_in(base)?
            }
            None => builder.tempdir()?,
        };
        let options = NemesisOptions {
            steps: args.faults,
            buyers: args.buyers,
            exe: Some(args.dropline_bin.clone()),
            ..NemesisOptions::new(seed)
        };
        match run_schedule(&options, dir.path()).await {
            Ok(report) => {
                println!("{}", report.line());
                acknowledged += report.verdict.acknowledged;
                indeterminate += report.indeterminate;
                faults += report.schedule.len();
                recovered.push(report.recovered_after);
                if !report.verdict.violations.is_empty() {
                    for v in &report.verdict.violations {
                        println!("  violation: {v}");
                    }
                    violations += report.verdict.violations.len();
                    failed.push(format!(
                        "seed {seed}: {} violations ({})",
                        report.verdict.violations.len(),
                        dir.keep().display()
                    ));
                }
            }
            Err(error) => {
                println!("nemesis seed {seed}: the run failed: {error:#}");
                failed.push(format!("seed {seed}: {error:#} ({})", dir.keep().display()));
            }
        }
        if !failed.is_empty() && !args.keep_going {
            break;
        }
    }
    recovered.sort();
    let p = |q: f64| {
        recovered
            .get(((recovered.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    };
    println!(
        "nemesis: {} schedules, {faults} faults, {acknowledged} acknowledged operations checked, {indeterminate} \
         indeterminate resolved, served again after the last heal p50 {:.1} s p99 {:.1} s max {:.1} s, \
         {violations} violations, {} failed schedules, {:.0} min",
        recovered.len(),
        p(0.5),
        p(0.99),
        p(1.0),
        failed.len(),
        started.elapsed().as_secs_f64() / 60.0
    );
    if !failed.is_empty() {
        anyhow::bail!("{}", failed.join("; "));
    }
    Ok(())
}
