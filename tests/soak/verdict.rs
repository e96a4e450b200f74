//! What the soak prints at the end, and whether it passed: every line below holds, or the
//! soak exits non-zero.
//! - Idempotent requests: none failed.
//! - POSTs: a failure only where its replica (or the gateway it went through) was SIGKILLed
//!   while it was under way, answered with a 502/504 envelope; none hung.
//! - Trace events: every event of every answered request indexed exactly once (by
//!   `eventId`), none missing, none dropped; those that died with a SIGKILLed process are
//!   counted apart.
//! - Resources: each gateway's RSS in the last third of the run within 10% of the first
//!   third (medians), and its open file descriptors flat; judged for a gateway that lived
//!   10 minutes or more, printed for all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::faults::{Injected, Killed};
use crate::resources::{after_each_outage, Sample};
use crate::stack::Stack;
use crate::traffic::{Answer, Method, Outcome};

/// A SIGKILL this long before an answer, or while it was under way, is to blame for it.
const KILL_BEFORE: f64 = 1.0;
/// A process SIGKILLed this long after it emitted an event may have held it in memory.
const HELD_FOR: f64 = 5.0;
/// Waiting for events to be indexed gives up after this long without progress.
const NO_PROGRESS_FOR: Duration = Duration::from_secs(60);
/// How much a long-lived gateway's anonymous memory may grow from the middle third of its
/// life to the last: past warm-up, a level series moves by noise, and a leak by a step per
/// fault.
const ANON_GROWTH_ALLOWED: f64 = 0.05;
/// A gateway's memory is judged only over a life this long. The first RabbitMQ outages and
/// replays raise RSS in steps before it levels off, so in a short run the thirds compare
/// before and after those steps, not the trend.
const JUDGED_FROM: f64 = 600.0;
/// A gateway's own descriptors may vary this much: an upstream connection per replica and
/// proxy thread comes and goes as replicas are killed and started again.
const FD_SLACK: usize = 6;

#[derive(Default)]
pub struct Verdict {
    lines: Vec<(Mark, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Pass,
    Fail,
    Info,
}

impl Verdict {
    fn check(&mut self, holds: bool, text: String) {
        let mark = if holds { Mark::Pass } else { Mark::Fail };
        self.lines.push((mark, text));
    }

    fn info(&mut self, text: String) {
        self.lines.push((Mark::Info, text));
    }

    pub fn passed(&self) -> bool {
        self.lines.iter().all(|(mark, _)| *mark != Mark::Fail)
    }

    pub fn print(&self) {
        for (mark, text) in &self.lines {
            let mark = match mark {
                Mark::Pass => "PASS",
                Mark::Fail => "FAIL",
                Mark::Info => "    ",
            };
            println!("[soak] {mark} {text}");
        }
    }
}

pub async fn judge(
    stack: &Stack,
    answers: &[Answer],
    injected: &[Injected],
    samples: &[Sample],
    run_for: f64,
    outage_loop: bool,
) -> Verdict {
    let mut verdict = Verdict::default();
    let kills: Vec<(Killed, f64)> = injected
        .iter()
        .filter_map(|i| i.killed.map(|k| (k, i.started)))
        .collect();
    let faults: Vec<String> = injected
        .iter()
        .map(|i| format!("{:.0}s {} ({})", i.started, i.fault.name(), i.target))
        .collect();
    verdict.info(format!("{} faults: {}", faults.len(), faults.join("; ")));
    traffic_lines(&mut verdict, answers, run_for);
    idempotent(&mut verdict, answers);
    posts(&mut verdict, answers, &kills);
    trace_events(&mut verdict, stack, answers, &kills).await;
    let outages: Vec<(f64, f64)> = injected.iter().map(|i| (i.started, i.ended)).collect();
    resources(&mut verdict, samples, outage_loop.then_some(&outages[..]));
    verdict
}

fn traffic_lines(verdict: &mut Verdict, answers: &[Answer], run_for: f64) {
    let gets = answers.iter().filter(|a| a.method == Method::Get).count();
    let mut latencies: Vec<f64> = answers
        .iter()
        .filter(|a| a.is_success())
        .map(|a| (a.answered - a.sent) * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    verdict.info(format!(
        "requests: {} ({gets} GET, {} POST), {:.0}/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
        answers.len(),
        answers.len() - gets,
        answers.len() as f64 / run_for,
        at(0.5),
        at(0.99),
        latencies.last().copied().unwrap_or(0.0),
    ));
}

fn idempotent(verdict: &mut Verdict, answers: &[Answer]) {
    let gets: Vec<&Answer> = answers.iter().filter(|a| a.method == Method::Get).collect();
    let failed: Vec<&&Answer> = gets.iter().filter(|a| !a.is_success()).collect();
    verdict.check(
        failed.is_empty(),
        format!(
            "idempotent requests: {} failed of {}",
            failed.len(),
            gets.len()
        ),
    );
    for answer in failed.iter().take(5) {
        verdict.info(format!("  failed GET: {}", describe(answer)));
    }
}

fn posts(verdict: &mut Verdict, answers: &[Answer], kills: &[(Killed, f64)]) {
    let posts: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.method == Method::Post)
        .collect();
    let (mut replica_killed, mut gateway_killed, mut hung, mut unexplained) = (0, 0, 0, Vec::new());
    for answer in posts.iter().filter(|a| !a.is_success()) {
        let killed_meanwhile = |wanted: &dyn Fn(&Killed) -> bool| {
            kills.iter().any(|(killed, at)| {
                wanted(killed) && *at >= answer.sent - KILL_BEFORE && *at <= answer.answered
            })
        };
        match &answer.outcome {
            Outcome::Answered {
                status: 502 | 504,
                envelope: true,
            } if killed_meanwhile(&|k| matches!(k, Killed::Replica(_))) => replica_killed += 1,
            Outcome::Failed(_) if killed_meanwhile(&|k| *k == Killed::Gateway(answer.gateway)) => {
                gateway_killed += 1
            }
            Outcome::Hung => hung += 1,
            _ => unexplained.push(*answer),
        }
    }
    verdict.check(
        hung == 0 && unexplained.is_empty(),
        format!(
            "POSTs: {} of {} failed: {replica_killed} a 502/504 envelope while their replica was SIGKILLed, {gateway_killed} cut off by a SIGKILLed gateway; {hung} hung, {} otherwise",
            replica_killed + gateway_killed + hung + unexplained.len(),
            posts.len(),
            unexplained.len()
        ),
    );
    for answer in unexplained.iter().take(5) {
        verdict.info(format!("  failed POST: {}", describe(answer)));
    }
}

fn describe(answer: &Answer) -> String {
    let outcome = match &answer.outcome {
        Outcome::Answered { status, envelope } => {
            format!("{status}{}", if *envelope { " envelope" } else { "" })
        }
        Outcome::Failed(error) => format!("failed: {error}"),
        Outcome::Hung => "no answer".into(),
    };
    format!(
        "{} at {:.1}s-{:.1}s via gateway :{}: {outcome}",
        answer.request_id, answer.sent, answer.answered, answer.gateway
    )
}

/// One event a request must leave in the index.
struct Expected<'a> {
    answer: &'a Answer,
    event: &'static str,
    /// For the service's events: the replica that served the request.
    service_id: Option<&'a str>,
}

async fn trace_events(
    verdict: &mut Verdict,
    stack: &Stack,
    answers: &[Answer],
    kills: &[(Killed, f64)],
) {
    let mut expected = Vec::new();
    for answer in answers.iter().filter(|a| a.gateway_answered()) {
        for event in ["request.start", "request.end"] {
            expected.push(Expected {
                answer,
                event,
                service_id: None,
            });
        }
        if let (true, Some(served_by)) = (answer.is_success(), &answer.served_by) {
            for event in ["service.start", "service.end"] {
                expected.push(Expected {
                    answer,
                    event,
                    service_id: Some(served_by),
                });
            }
        }
    }
    let started = Instant::now();
    let mut missing = wait_for_events(stack, &expected).await;
    verdict.info(format!(
        "waited {:.0}s after the traffic for the last events to be indexed",
        started.elapsed().as_secs_f64()
    ));

    let (mut with_replica, mut with_gateway) = (0, 0);
    missing.retain(|e| {
        let killed_after = |wanted: Killed| {
            kills.iter().any(|(killed, at)| {
                *killed == wanted
                    && *at >= e.answer.answered - KILL_BEFORE
                    && *at <= e.answer.answered + HELD_FOR
            })
        };
        let lost_with_kill = match e.service_id {
            None => killed_after(Killed::Gateway(e.answer.gateway)),
            Some(node) => port_of(node).is_some_and(|port| killed_after(Killed::Replica(port))),
        };
        if lost_with_kill {
            match e.service_id {
                None => with_gateway += 1,
                Some(_) => with_replica += 1,
            }
        }
        !lost_with_kill
    });
    let (duplicates, indexed) = {
        let store = stack.es.store.lock().unwrap();
        let duplicates = store.creates.values().filter(|&&n| n > 1).count();
        (duplicates, store.documents.len())
    };
    let dropped = dropped_events(stack).await;
    verdict.check(
        missing.is_empty() && duplicates == 0 && dropped == 0,
        format!(
            "trace events: {} expected, {indexed} indexed; {} missing, {duplicates} indexed twice, {dropped} dropped",
            expected.len(),
            missing.len() + with_replica + with_gateway,
        ),
    );
    for e in missing.iter().take(5) {
        verdict.info(format!("  missing {} of {}", e.event, describe(e.answer)));
    }
    let replica_kills = kills
        .iter()
        .filter(|(k, _)| matches!(k, Killed::Replica(_)))
        .count();
    let gateway_kills = kills
        .iter()
        .filter(|(k, _)| matches!(k, Killed::Gateway(_)))
        .count();
    verdict.check(
        with_replica == 0 && with_gateway == 0,
        format!(
            "lost with a SIGKILLed process: {with_replica} service events ({replica_kills} replica kills), {with_gateway} gateway events ({gateway_kills} gateway kills)"
        ),
    );
}

fn port_of(node_id: &str) -> Option<u16> {
    node_id.rsplit_once(':')?.1.parse().ok()
}

/// Polls the stand-in until every expected event is there, or nothing more arrived for
/// [`NO_PROGRESS_FOR`]; returns the events still missing.
async fn wait_for_events<'a>(stack: &Stack, expected: &'a [Expected<'a>]) -> Vec<&'a Expected<'a>> {
    let mut best = usize::MAX;
    let mut progress_at = Instant::now();
    loop {
        let missing = missing_events(stack, expected);
        if missing.is_empty() || progress_at.elapsed() > NO_PROGRESS_FOR {
            return missing;
        }
        if missing.len() < best {
            best = missing.len();
            progress_at = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn missing_events<'a>(stack: &Stack, expected: &'a [Expected<'a>]) -> Vec<&'a Expected<'a>> {
    let store = stack.es.store.lock().unwrap();
    let mut by_request: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for document in store.documents.values() {
        let field = |name: &str| document[name].as_str().unwrap_or_default();
        by_request
            .entry(field("requestId"))
            .or_default()
            .push((field("event"), field("serviceId")));
    }
    expected
        .iter()
        .filter(|e| {
            let found = by_request
                .get(e.answer.request_id.as_str())
                .is_some_and(|events| {
                    events.iter().any(|(event, service_id)| {
                        *event == e.event && e.service_id.is_none_or(|id| id == *service_id)
                    })
                });
            !found
        })
        .collect()
}

/// Events the gateways count as dropped, plus every log line of any process (those
/// killed included) that reports a drop.
async fn dropped_events(stack: &Stack) -> u64 {
    let processes = stack.processes.lock().await;
    let client = crate::support::http();
    let mut dropped = 0;
    for gateway in &processes.gateways {
        let url = format!("http://127.0.0.1:{}/metrics", gateway.port);
        let text = match client.get(&url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        dropped += text
            .lines()
            .find_map(|l| l.strip_prefix("goms_trace_events_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    let logs = processes
        .gateways
        .iter()
        .chain(&processes.replicas)
        .chain(std::iter::once(&processes.consumer))
        .map(|p| &p.goms)
        .chain(&processes.retired);
    for goms in logs {
        if goms.has_line("events dropped") || goms.has_line("events may be lost") {
            println!(
                "[soak] {} reported lost events:\n{}",
                goms.name,
                goms.output()
            );
            dropped += 1;
        }
    }
    dropped
}

/// Each gateway's memory and descriptors over its last life. Judged on the medians of the
/// middle and last thirds: of the whole series, or with `outages` (`--outage-loop`) of the
/// samples 10 s after each outage, since memory in that loop swings with each outage and
/// replay, and a leak is an after-value that climbs outage after outage.
fn resources(verdict: &mut Verdict, samples: &[Sample], outages: Option<&[(f64, f64)]>) {
    let gateways = samples.iter().map(|s| s.gateway).max().map_or(0, |g| g + 1);
    for gateway in 0..gateways {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.gateway == gateway).collect();
        // The last incarnation: a gateway started again begins a new series.
        let Some(last_pid) = mine.last().map(|s| s.pid) else {
            continue;
        };
        let series: Vec<&Sample> = mine.into_iter().filter(|s| s.pid == last_pid).collect();
        let span = series.last().unwrap().at - series[0].at;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let trend: Vec<String> = series
            .iter()
            .step_by((series.len() / 12).max(1))
            .map(|s| {
                format!(
                    "{:.0}s {:.1}+{:.1}/{:.1}/{}+{}",
                    s.at,
                    mib(s.anon_kib),
                    mib(s.file_kib),
                    mib(s.committed_kib),
                    s.fds,
                    s.client_connections
                )
            })
            .collect();
        verdict.info(format!(
            "gateway-{gateway} over time (RssAnon+RssFile/allocator committed MiB, own fds+client connections): {}",
            trend.join(", ")
        ));
        if span < JUDGED_FROM {
            verdict.info(format!(
                "gateway-{gateway}: {span:.0}s of one life is too short to tell warm-up from a leak (judged from {JUDGED_FROM:.0}s on)"
            ));
            continue;
        }
        let (judged, over) = match outages {
            Some(outages) => (
                after_each_outage(&series, outages),
                "10 s after each outage",
            ),
            None => (series, "the series"),
        };
        let third = judged.len() / 3;
        if third == 0 {
            verdict.info(format!("gateway-{gateway}: too few samples to judge"));
            continue;
        }
        let (middle, last) = (&judged[third..2 * third], &judged[judged.len() - third..]);
        // Medians: a fault's replay or reconnect raises memory for seconds, which says
        // nothing of a leak; a leak raises the median.
        let median = |part: &[&Sample], of: fn(&Sample) -> u64| {
            let mut values: Vec<u64> = part.iter().map(|s| of(s)).collect();
            values.sort_unstable();
            values[values.len() / 2]
        };
        let (anon_middle, anon_last) = (
            mib(median(middle, |s| s.anon_kib)),
            mib(median(last, |s| s.anon_kib)),
        );
        let (file_middle, file_last) = (
            mib(median(middle, |s| s.file_kib)),
            mib(median(last, |s| s.file_kib)),
        );
        let growth = anon_last / anon_middle - 1.0;
        let (fds_middle, fds_last) = (
            median(middle, |s| s.fds as u64),
            median(last, |s| s.fds as u64),
        );
        verdict.check(
            growth <= ANON_GROWTH_ALLOWED && fds_last <= fds_middle + FD_SLACK as u64,
            format!(
                "resources, gateway-{gateway} over {span:.0}s: RssAnon {anon_middle:.1} -> {anon_last:.1} MiB ({:+.1}%, at most {:+.0}%), own open fds {fds_middle} -> {fds_last} (at most +{FD_SLACK}; client connections apart); medians of the middle and last thirds of {over}. RssFile (page cache, not judged) {file_middle:.1} -> {file_last:.1} MiB",
                growth * 100.0,
                ANON_GROWTH_ALLOWED * 100.0
            ),
        );
    }
}
