//! The chaos soak: the whole process stack on this machine under steady GET and POST
//! traffic, one fault every 30 s, then a verdict on what was lost. `scripts/soak.sh
//! --minutes N` runs it; `docs/operations.md` explains the figures.
//!
//! It is not part of `cargo test` (`test = false` in Cargo.toml): it runs for minutes and
//! prints figures. `cargo test --test soak -- --help` lists its flags.
//!
//! - `stack`: etcd and RabbitMQ containers, the Elasticsearch stand-in, two gateways, three
//!   `user` replicas and a trace consumer, each restartable as the same node.
//! - `traffic`: the client, which records every answer.
//! - `faults`: what is injected, and when.
//! - `resources`: the gateways' RSS and open descriptors over time.
//! - `verdict`: the checks, and what they print.

#[path = "../support/mod.rs"]
mod support;

mod faults;
mod resources;
mod stack;
mod traffic;
mod verdict;

use std::process::ExitCode;
use std::time::{Duration, Instant};

const HELP: &str = "\
The goms chaos soak: etcd, RabbitMQ, the Elasticsearch stand-in, two gateways, three `user`
replicas and a trace consumer, under steady traffic, with one fault every 30 s.

Usage: cargo test --test soak -- [OPTIONS]   (or scripts/soak.sh [OPTIONS])

Options:
  --minutes N       how long the traffic runs (default 3; fractions allowed)
  --seed N          seeds the order of the faults and their targets (default: the time)
  --fault-every S   seconds between faults (default 30)
  --rate N          requests per second over both gateways (default 100)
  --workers N       concurrent client connections (default 8)
  --outage-loop N   instead of mixed faults, N RabbitMQ outages of 15 s, 15 s apart, at 200
                    requests/s unless --rate says otherwise; prints the first gateway's
                    memory (RssAnon, RssFile, allocator) before, during and 10 s after each
                    (issue 37: a leak climbs outage after outage, buffers level off)
  -h, --help        this text

Exits 0 when every PASS/FAIL line holds, 1 otherwise.";

struct Args {
    minutes: f64,
    seed: u64,
    fault_every: Duration,
    rate: u32,
    workers: usize,
    outage_loop: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        minutes: 3.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
        fault_every: Duration::from_secs(30),
        rate: 100,
        workers: 8,
        outage_loop: 0,
    };
    let mut rate_given = false;
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = given
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--minutes" => args.minutes = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--fault-every" => {
                args.fault_every = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?)
            }
            "--rate" => {
                args.rate = value.parse().map_err(|e| bad(&e))?;
                rate_given = true;
            }
            "--outage-loop" => args.outage_loop = value.parse().map_err(|e| bad(&e))?,
            "--workers" => args.workers = value.parse().map_err(|e| bad(&e))?,
            // `cargo test` passes these to every test binary.
            "--test-threads" => {}
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.outage_loop > 0 {
        if !rate_given {
            args.rate = 200;
        }
        // Stopping and starting RabbitMQ takes seconds on top of the outage itself.
        let cycle = OUTAGE_DOWN + OUTAGE_GAP + OUTAGE_SLACK;
        args.minutes = (OUTAGE_GAP + cycle * args.outage_loop as u32).as_secs_f64() / 60.0;
    }
    Ok(args)
}

/// `--outage-loop`: each RabbitMQ outage lasts this long, and this long passes between them.
const OUTAGE_DOWN: Duration = Duration::from_secs(15);
const OUTAGE_GAP: Duration = Duration::from_secs(15);
/// What stopping and starting the RabbitMQ container adds to an outage, at most (seen: 16 s:
/// a graceful stop of up to 10 s, then a start).
const OUTAGE_SLACK: Duration = Duration::from_secs(20);

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) if error.is_empty() => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{error}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    println!(
        "[soak] seed {}, {} min, a fault every {:?}, {} requests/s over {} connections",
        args.seed, args.minutes, args.fault_every, args.rate, args.workers
    );
    let stack = stack::Stack::start().await;
    let gateways = {
        let processes = stack.processes.lock().await;
        processes.gateways.iter().map(|g| g.port).collect()
    };
    println!("[soak] stack up; traffic starts");
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs_f64(args.minutes * 60.0);
    let traffic = traffic::Traffic {
        gateways,
        rate: args.rate,
        workers: args.workers,
        seed: args.seed,
    };
    let faults = async {
        if args.outage_loop > 0 {
            faults::outage_loop(&stack, t0, args.outage_loop, OUTAGE_DOWN, OUTAGE_GAP).await
        } else {
            faults::inject_until(&stack, t0, until, args.fault_every, args.seed).await
        }
    };
    let (answers, injected, samples) = tokio::join!(
        traffic.run(t0, until),
        faults,
        resources::sample_until(&stack, t0, until),
    );
    if args.outage_loop > 0 {
        let outages: Vec<(f64, f64)> = injected.iter().map(|i| (i.started, i.ended)).collect();
        for line in resources::outage_table(&samples, &outages) {
            println!("[soak] {line}");
        }
    }
    let run_for = args.minutes * 60.0;
    println!(
        "[soak] traffic over; {} faults injected; checking",
        injected.len()
    );
    let outage_loop = args.outage_loop > 0;
    let verdict = verdict::judge(&stack, &answers, &injected, &samples, run_for, outage_loop).await;
    verdict.print();
    if verdict.passed() {
        println!("[soak] PASSED (seed {})", args.seed);
        ExitCode::SUCCESS
    } else {
        println!(
            "[soak] FAILED (seed {}; the same seed injects the same faults in the same order)",
            args.seed
        );
        ExitCode::FAILURE
    }
}

/// An error and its sources on one line.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// splitmix64: a seeded sequence, so that a seed repeats a run's faults.
mod rng {
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }

        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// A number in `0..n`.
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        pub fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }
}
