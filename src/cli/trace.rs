//! `goms trace <requestId>`: a request's timeline in the terminal, one line per event and
//! attempt, with offsets, durations and aligned bars (coloured on a terminal). From a
//! gateway's admin listener (`--gateway`: its own record of the request, plus the services'
//! events it finds in Elasticsearch) or from Elasticsearch alone (`--es`, default `esAddr`).

use std::io::IsTerminal;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::GomsConfig;
use crate::trace::search::TraceIndex;

const BAR_WIDTH: usize = 40;

/// What the gateway knows of a request, from its ring or from its two events.
#[derive(Debug, Default, PartialEq)]
pub struct GatewayPart {
    pub method: String,
    pub path: String,
    pub status: Option<u64>,
    pub duration_ms: f64,
    pub attempts: Vec<AttemptPart>,
}

#[derive(Debug, PartialEq)]
pub struct AttemptPart {
    pub replica: String,
    pub offset_ms: f64,
    pub duration_ms: f64,
    pub status: Option<u64>,
    pub error: Option<String>,
}

/// One line of the timeline.
#[derive(Debug, PartialEq)]
pub struct Row {
    pub label: String,
    pub offset_ms: f64,
    pub duration_ms: f64,
    pub detail: String,
    pub failed: bool,
}

pub async fn run(
    config: &GomsConfig,
    request_id: &str,
    es: Option<&str>,
    gateway: Option<&str>,
) -> anyhow::Result<()> {
    let (gateway_part, events, note) = match gateway {
        Some(address) => from_gateway(address, request_id).await?,
        None => {
            let es = es.unwrap_or(&config.es_addr);
            let index = TraceIndex::new(es, &config.trace_consumer.index_prefix)?;
            let events = index.events_of(request_id).await?;
            (gateway_part_from_events(&events), events, None)
        }
    };
    if gateway_part.is_none() && events.is_empty() {
        bail!("no trace of request {request_id} (the gateway keeps its last 1,000 requests; Elasticsearch has what was indexed)");
    }
    let rows = rows(gateway_part.as_ref(), &events);
    print!(
        "{}",
        render(
            request_id,
            gateway_part.as_ref(),
            &rows,
            std::io::stdout().is_terminal()
        )
    );
    if let Some(note) = note {
        println!("{note}");
    }
    Ok(())
}

async fn from_gateway(
    address: &str,
    request_id: &str,
) -> anyhow::Result<(Option<GatewayPart>, Vec<Value>, Option<String>)> {
    let id: String = url::form_urlencoded::byte_serialize(request_id.as_bytes()).collect();
    let body = super::cluster::get_from_gateway(address, &format!("/ui/api/trace/{id}")).await?;
    let document: Value =
        serde_json::from_str(&body).with_context(|| format!("gateway {address} sent no JSON"))?;
    let events = document["events"].as_array().cloned().unwrap_or_default();
    let note = (document["elasticsearch"]["reachable"] == false).then(|| {
        format!(
            "Elasticsearch cannot be reached ({}): the services' events are missing.",
            document["elasticsearch"]["error"]
                .as_str()
                .unwrap_or("no detail")
        )
    });
    let gateway = &document["gateway"];
    let part = (!gateway.is_null()).then(|| GatewayPart {
        method: text(&gateway["method"]),
        path: text(&gateway["path"]),
        status: gateway["status"].as_u64().filter(|s| *s != 0),
        duration_ms: gateway["durationMs"].as_f64().unwrap_or(0.0),
        attempts: gateway["attempts"]
            .as_array()
            .map(|attempts| {
                attempts
                    .iter()
                    .map(|a| AttemptPart {
                        replica: text(&a["replica"]),
                        offset_ms: a["offsetMs"].as_f64().unwrap_or(0.0),
                        duration_ms: a["durationMs"].as_f64().unwrap_or(0.0),
                        status: a["status"].as_u64(),
                        error: a["error"].as_str().map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    });
    // The gateway may have let the request go: its events in Elasticsearch still tell.
    let part = part.or_else(|| gateway_part_from_events(&events));
    Ok((part, events, note))
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// The gateway's part from its `request.start` and `request.end` events. Events carry each
/// attempt's duration but not its start, so attempts are laid end to end.
pub fn gateway_part_from_events(events: &[Value]) -> Option<GatewayPart> {
    let end = events.iter().find(|e| e["event"] == "request.end")?;
    let mut offset = 0.0;
    let attempts = end["trace"]["timing"]["attempts"]
        .as_array()
        .map(|attempts| {
            attempts
                .iter()
                .map(|a| {
                    let duration = a["durationMs"].as_f64().unwrap_or(0.0);
                    let part = AttemptPart {
                        replica: text(&a["node"]),
                        offset_ms: offset,
                        duration_ms: duration,
                        status: a["status"].as_u64(),
                        error: a["error"].as_str().map(str::to_string),
                    };
                    offset += duration;
                    part
                })
                .collect()
        })
        .unwrap_or_default();
    Some(GatewayPart {
        method: text(&end["request"]["method"]),
        path: text(&end["request"]["url"]),
        status: end["status"].as_u64(),
        duration_ms: end["durationMs"].as_f64().unwrap_or(0.0),
        attempts,
    })
}

/// The timeline's lines: the request's start, each attempt, each service's span (drawn
/// inside the attempt that reached it, as the dashboard draws it), the request's end.
pub fn rows(gateway: Option<&GatewayPart>, events: &[Value]) -> Vec<Row> {
    let mut rows = Vec::new();
    if let Some(g) = gateway {
        rows.push(Row {
            label: format!("request.start {} {}", g.method, g.path),
            offset_ms: 0.0,
            duration_ms: 0.0,
            detail: String::new(),
            failed: false,
        });
        for (n, a) in g.attempts.iter().enumerate() {
            rows.push(Row {
                label: format!("attempt {} -> {}", n + 1, a.replica),
                offset_ms: a.offset_ms,
                duration_ms: a.duration_ms,
                detail: match (a.status, &a.error) {
                    (Some(status), _) => format!("status {status}"),
                    (None, Some(error)) => error.trim().to_string(),
                    (None, None) => String::new(),
                },
                failed: a.error.is_some() || a.status.is_some_and(|s| s >= 500),
            });
        }
    }
    let attempts = gateway.map(|g| &g.attempts[..]).unwrap_or_default();
    for event in events.iter().filter(|e| e["event"] == "service.end") {
        let service_id = text(&event["serviceId"]);
        let length = event["durationMs"].as_f64().unwrap_or(0.0);
        let reached = attempts.iter().rfind(|a| a.replica == service_id);
        let offset = reached.map_or(0.0, |a| {
            a.offset_ms + ((a.duration_ms - length) / 2.0).max(0.0)
        });
        let status = event["status"].as_u64();
        rows.push(Row {
            label: format!("{} {} (service)", text(&event["serviceName"]), service_id),
            offset_ms: offset,
            duration_ms: length,
            detail: status.map(|s| format!("status {s}")).unwrap_or_default(),
            failed: status.is_some_and(|s| s >= 500),
        });
    }
    if let Some(g) = gateway {
        rows.push(Row {
            label: "request.end".into(),
            offset_ms: 0.0,
            duration_ms: g.duration_ms,
            detail: g
                .status
                .map_or("no answer".into(), |s| format!("status {s}")),
            failed: g.status.is_none_or(|s| s >= 500),
        });
    }
    rows
}

/// The timeline as text: a heading, then one line per row with its offset, its duration,
/// and a bar on a common scale.
pub fn render(
    request_id: &str,
    gateway: Option<&GatewayPart>,
    rows: &[Row],
    colour: bool,
) -> String {
    let total = rows
        .iter()
        .map(|r| r.offset_ms + r.duration_ms)
        .fold(0.0_f64, f64::max)
        .max(0.001);
    let label_width = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("request {request_id}");
    if let Some(g) = gateway {
        out.push_str(&format!(
            ": {} {} -> {} in {:.2} ms, {} attempt(s)",
            g.method,
            g.path,
            g.status.map_or("no answer".into(), |s| s.to_string()),
            g.duration_ms,
            g.attempts.len()
        ));
    }
    out.push('\n');
    for row in rows {
        let start = ((row.offset_ms / total) * BAR_WIDTH as f64).round() as usize;
        let start = start.min(BAR_WIDTH - 1);
        let length = (((row.duration_ms / total) * BAR_WIDTH as f64).round() as usize)
            .clamp(1, BAR_WIDTH - start);
        let bar = format!(
            "{}{}{}",
            " ".repeat(start),
            "#".repeat(length),
            " ".repeat(BAR_WIDTH - start - length)
        );
        let bar = match (colour, row.failed) {
            (false, _) => bar,
            (true, true) => format!("\x1b[31m{bar}\x1b[0m"),
            (true, false) => format!("\x1b[32m{bar}\x1b[0m"),
        };
        out.push_str(&format!(
            "  {:<label_width$}  +{:>8.2} ms  {:>8.2} ms  |{bar}|  {}\n",
            row.label, row.offset_ms, row.duration_ms, row.detail
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn retried_request_events() -> Vec<Value> {
        vec![
            json!({"event": "request.start", "time": "2026-12-04T10:00:00.000Z"}),
            json!({"event": "service.start", "serviceName": "user", "serviceId": "b:2", "time": "2026-12-04T10:00:00.004Z"}),
            json!({"event": "service.end", "serviceName": "user", "serviceId": "b:2", "durationMs": 2.0, "status": 200, "time": "2026-12-04T10:00:00.006Z"}),
            json!({"event": "request.end", "durationMs": 10.0, "status": 200,
                   "request": {"method": "GET", "url": "/api/user/login"},
                   "trace": {"timing": {"attempts": [
                       {"node": "a:1", "durationMs": 4.0, "status": 503},
                       {"node": "b:2", "durationMs": 5.0, "status": 200}]}}}),
        ]
    }

    #[test]
    fn a_retried_request_reads_as_two_attempts_and_the_service_inside_the_second() {
        let events = retried_request_events();
        let gateway = gateway_part_from_events(&events).unwrap();
        assert_eq!(gateway.attempts[1].offset_ms, 4.0, "attempts end to end");
        let rows = rows(Some(&gateway), &events);
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "request.start GET /api/user/login",
                "attempt 1 -> a:1",
                "attempt 2 -> b:2",
                "user b:2 (service)",
                "request.end"
            ]
        );
        assert!(rows[1].failed && !rows[2].failed);
        assert_eq!(
            rows[3].offset_ms, 5.5,
            "centred in the attempt that reached it"
        );
        let text = render("r-1", Some(&gateway), &rows, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "request r-1: GET /api/user/login -> 200 in 10.00 ms, 2 attempt(s)"
        );
        assert!(
            lines[2].contains("+    0.00 ms      4.00 ms  |################"),
            "{text}"
        );
        assert!(lines[2].ends_with("status 503"), "{text}");
        // Every bar is the same width, so the columns line up.
        let bars: Vec<usize> = lines[1..].iter().map(|l| l.find('|').unwrap()).collect();
        assert!(bars.windows(2).all(|w| w[0] == w[1]), "{text}");
        assert!(!text.contains('\x1b'));
        assert!(render("r-1", Some(&gateway), &rows, true).contains("\x1b[31m"));
    }
}
