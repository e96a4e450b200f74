//! The soak's client: steady GET and POST traffic spread over both gateways, as a load
//! balancer in front of them would send it, recording every answer.
//!
//! A connection refused (a gateway that is down) sends any request to the other gateway, since
//! nothing was sent. A GET that fails after it was sent is sent to the other gateway too, as
//! it is idempotent; a POST that fails after it was sent is recorded as failed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rng::Rng;

/// Longer than any gateway timeout: an answer later than this is a hang.
const HANG_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// An HTTP answer; `envelope` when its body is goms's JSON error envelope.
    Answered { status: u16, envelope: bool },
    /// The connection failed after the request was sent (or every gateway refused it).
    Failed(String),
    /// No answer within [`HANG_AFTER`].
    Hung,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub request_id: String,
    pub method: Method,
    /// Seconds since the traffic started.
    pub sent: f64,
    pub answered: f64,
    pub outcome: Outcome,
    /// The gateway port that answered (or was tried last).
    pub gateway: u16,
    /// `X-Served-By`: the replica's node id.
    pub served_by: Option<String>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        matches!(self.outcome, Outcome::Answered { status, .. } if (200..300).contains(&status))
    }

    /// The gateway answered over HTTP, so its trace events exist.
    pub fn gateway_answered(&self) -> bool {
        matches!(self.outcome, Outcome::Answered { .. })
    }
}

pub struct Traffic {
    pub gateways: Vec<u16>,
    /// Requests per second, over all workers.
    pub rate: u32,
    pub workers: usize,
    pub seed: u64,
}

impl Traffic {
    /// Sends requests from `t0` until `until`; returns every answer.
    pub async fn run(self, t0: Instant, until: Instant) -> Vec<Answer> {
        // Idle connections go before the gateway's 60 s idle timeout closes them.
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(30))
            .timeout(HANG_AFTER)
            .build()
            .expect("HTTP client");
        let answers = Arc::new(Mutex::new(Vec::new()));
        let period = Duration::from_secs_f64(self.workers as f64 / f64::from(self.rate.max(1)));
        let worker_count = self.workers;
        let mut tasks = Vec::new();
        for worker in 0..self.workers {
            let client = client.clone();
            let gateways = self.gateways.clone();
            let answers = answers.clone();
            let mut rng = Rng::new(self.seed ^ (worker as u64 + 1).wrapping_mul(0x9E37_79B9));
            tasks.push(tokio::spawn(async move {
                // Workers start spread over one period, so the load is even.
                let workers = worker_count as f64;
                let mut next = t0 + period.mul_f64(worker as f64 / workers);
                let mut sent = 0usize;
                while next < until {
                    tokio::time::sleep_until(next.into()).await;
                    next += period;
                    let method = if rng.below(2) == 0 {
                        Method::Get
                    } else {
                        Method::Post
                    };
                    let first = (worker + sent) % gateways.len();
                    sent += 1;
                    let answer = send(&client, &gateways, first, method, t0).await;
                    answers.lock().unwrap().push(answer);
                }
            }));
        }
        for task in tasks {
            task.await.expect("traffic worker");
        }
        let mut answers = std::mem::take(&mut *answers.lock().unwrap());
        answers.sort_by(|a, b| a.sent.total_cmp(&b.sent));
        answers
    }
}

async fn send(
    client: &reqwest::Client,
    gateways: &[u16],
    first: usize,
    method: Method,
    t0: Instant,
) -> Answer {
    let request_id = uuid::Uuid::new_v4().to_string();
    let sent = t0.elapsed().as_secs_f64();
    let mut last_error = String::new();
    let mut gateway = gateways[first];
    for offset in 0..gateways.len() {
        gateway = gateways[(first + offset) % gateways.len()];
        let url = format!("http://127.0.0.1:{gateway}/api/user/register");
        let request = match method {
            Method::Get => client.get(&url),
            Method::Post => client.post(&url).json(&serde_json::json!({
                "name": "soak",
                "padding": "p".repeat(900),
            })),
        };
        let result = request.header("x-request-id", &request_id).send().await;
        let answered = || t0.elapsed().as_secs_f64();
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let served_by = response
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = response.bytes().await.unwrap_or_default();
                let envelope = serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|v| v.get("msg").is_some() && v.get("code").is_some());
                return Answer {
                    request_id,
                    method,
                    sent,
                    answered: answered(),
                    outcome: Outcome::Answered { status, envelope },
                    gateway,
                    served_by,
                };
            }
            Err(error) if error.is_timeout() => {
                return Answer {
                    request_id,
                    method,
                    sent,
                    answered: answered(),
                    outcome: Outcome::Hung,
                    gateway,
                    served_by: None,
                };
            }
            Err(error) => {
                last_error = crate::one_line(&error);
                let may_go_on = error.is_connect() || method == Method::Get;
                if !may_go_on {
                    break;
                }
            }
        }
    }
    Answer {
        request_id,
        method,
        sent,
        answered: t0.elapsed().as_secs_f64(),
        outcome: Outcome::Failed(last_error),
        gateway,
        served_by: None,
    }
}
