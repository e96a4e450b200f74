//! HTTPS on the gateway (`gateway.tls`), through real clients: reqwest over rustls, `curl`,
//! and `openssl s_client` for SNI and protocol versions. Real etcd, a real replica, a real
//! gateway; certificates made by rcgen, replaced on disk while the gateway runs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{
    eventually, free_port, http, metric, route_file, text_of, wait_for_nodes, Etcd, Goms, ROUTES,
};

/// A certificate and its key as PEM text.
struct Pem {
    cert: String,
    key: String,
}

fn certificate(names: &[&str], expired: bool) -> Pem {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0].as_str());
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    let cert = params.self_signed(&key).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Writes a file the way a renewal does: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A gateway with HTTPS on a port of its own, two certificates (`a.test`, the default, and
/// `*.b.test`), the redirect and HSTS on, in front of one `user` replica.
struct Stage {
    _etcd: Etcd,
    _service: Goms,
    _folders: (tempfile::TempDir, tempfile::TempDir),
    files: PathBuf,
    gateway: Goms,
    https_port: u16,
    admin_port: u16,
    a: Pem,
    b: Pem,
}

impl Stage {
    async fn start() -> Stage {
        let etcd = Etcd::start().await;
        let service = Goms::service(&etcd, free_port(), &[]);
        let (routes_folder, routes) = route_file(ROUTES);
        let folder = tempfile::tempdir().unwrap();
        let files = folder.path().to_path_buf();
        let (a, b) = (
            certificate(&["a.test"], false),
            certificate(&["*.b.test"], false),
        );
        for (name, pem) in [("a", &a), ("b", &b)] {
            std::fs::write(files.join(format!("{name}.crt")), &pem.cert).unwrap();
            std::fs::write(files.join(format!("{name}.key")), &pem.key).unwrap();
        }
        let config = files.join("goms.yml");
        let dir = files.display();
        std::fs::write(
            &config,
            format!(
                "gateway:\n  limits:\n    headerTimeout: 2s\n  tls:\n    listen: 127.0.0.1:0\n    redirect: true\n    hsts: max-age=600\n    reloadInterval: 200ms\n    certificates:\n      - {{cert: {dir}/a.crt, key: {dir}/a.key}}\n      - {{cert: {dir}/b.crt, key: {dir}/b.key}}\n"
            ),
        )
        .unwrap();
        let routes = routes.display().to_string();
        let endpoint = etcd.endpoint();
        let args = [
            "gateway",
            "--http-port",
            "0",
            "--etcd-addr",
            &endpoint,
            "--routes",
            &routes,
        ];
        let gateway = Goms::spawn_configured("gateway", &config, &args, &[])
            .serving()
            .await;
        let marker = "TLS listen on ";
        gateway.wait_for_line(marker, Duration::from_secs(10)).await;
        let https_port = gateway
            .logged_addr(marker)
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the TLS port in the log");
        // The plain port redirects, /cluster too: the admin listener answers it.
        let admin = gateway.logged_addr("admin (/cluster, /metrics) on ");
        let admin_port = admin.rsplit(':').next().unwrap().parse().unwrap();
        wait_for_nodes(admin_port, "user", 1).await;
        Stage {
            _etcd: etcd,
            _service: service,
            _folders: (routes_folder, folder),
            files,
            gateway,
            https_port,
            admin_port,
            a,
            b,
        }
    }

    /// A client that trusts only `root` and reaches `name` at this gateway's HTTPS port.
    fn client(&self, name: &str, root: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
            .resolve(name, ([127, 0, 0, 1], self.https_port).into())
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    fn url(&self, name: &str, path: &str) -> String {
        format!("https://{name}:{}{path}", self.https_port)
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        http().get(url).send().await.unwrap().text().await.unwrap()
    }

    /// The subject `openssl s_client` was served for `server_name`, or its failure.
    fn served_subject(&self, server_name: &str, extra: &[&str]) -> Result<String, String> {
        let connect = format!("127.0.0.1:{}", self.https_port);
        let output = Command::new("openssl")
            .args(["s_client", "-connect", &connect, "-servername", server_name])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs");
        let text = String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(text);
        }
        text.lines()
            .find_map(|line| line.strip_prefix("subject="))
            .map(|subject| subject.to_string())
            .ok_or(text)
    }
}

#[tokio::test]
async fn https_serves_each_name_its_certificate_and_tells_the_replica() {
    let stage = Stage::start().await;

    // Each name gets its own certificate: a client trusting only that one gets through.
    let a = stage.client("a.test", &stage.a.cert);
    let answer = a
        .get(stage.url("a.test", "/api/user/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["strict-transport-security"], "max-age=600");
    // The gateway's own answers too, such as a 404 for an unknown route.
    let unknown = a
        .get(stage.url("a.test", "/api/user/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.headers()["strict-transport-security"],
        "max-age=600"
    );
    let body: serde_json::Value = answer.json().await.unwrap();
    let headers = &body["data"]["headers"];
    assert_eq!(headers["X-Forwarded-Proto"], "https");
    assert_eq!(
        headers["X-Forwarded-Host"],
        format!("a.test:{}", stage.https_port)
    );
    let b = stage.client("shop.b.test", &stage.b.cert);
    let answer = b
        .get(stage.url("shop.b.test", "/api/user/login"))
        .send()
        .await;
    assert_eq!(answer.unwrap().status(), 200, "the wildcard certificate");
    // A client that trusts only b's certificate is refused a.test's.
    let wrong = stage.client("a.test", &stage.b.cert);
    assert!(wrong
        .get(stage.url("a.test", "/api/user/login"))
        .send()
        .await
        .is_err());

    // An unknown name gets the first certificate; TLS 1.2 and 1.3 are offered, 1.0 is not.
    assert_eq!(stage.served_subject("x.test", &[]).unwrap(), "CN = a.test");
    assert_eq!(
        stage.served_subject("shop.b.test", &[]).unwrap(),
        "CN = *.b.test"
    );
    let tls12 = stage.served_subject("a.test", &["-tls1_2"]);
    assert!(tls12.is_ok(), "{tls12:?}");
    let tls13 = stage.served_subject("a.test", &["-tls1_3"]);
    assert!(tls13.is_ok(), "{tls13:?}");
    let tls10 = stage.served_subject("a.test", &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    assert!(tls10.is_err(), "TLS 1.0 was accepted: {tls10:?}");

    // curl, as a user would call it.
    let root = stage.files.join("a.crt");
    let resolve = format!("a.test:{}:127.0.0.1", stage.https_port);
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--cacert", &root.display().to_string()])
        .args([
            "--resolve",
            &resolve,
            &stage.url("a.test", "/api/user/login"),
        ])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("\"code\":0"),
        "{text}"
    );

    // The plain port sends requests to HTTPS, except the health checks.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = format!(
        "http://127.0.0.1:{}/api/user/login?a=1",
        stage.gateway.port()
    );
    let answer = plain.post(url).send().await.unwrap();
    assert_eq!(answer.status(), 308);
    assert_eq!(
        answer.headers()["location"],
        format!("https://127.0.0.1:{}/api/user/login?a=1", stage.https_port).as_str()
    );
    let healthz = format!("http://127.0.0.1:{}/healthz", stage.gateway.port());
    assert_eq!(plain.get(healthz).send().await.unwrap().status(), 200);

    // Each certificate's expiry is on /metrics.
    let metrics = stage.metrics().await;
    let expiry = metrics
        .lines()
        .find(|line| {
            line.starts_with("goms_tls_certificate_expiry_timestamp_seconds")
                && line.contains("names=\"a.test\"")
        })
        .unwrap_or_else(|| panic!("no expiry for a.test in:\n{metrics}"));
    let seconds: f64 = expiry.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        seconds > 4_000_000_000.0,
        "rcgen's default validity ends in 4096: {expiry}"
    );
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_an_error_and_does_not_hang() {
    let stage = Stage::start().await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", stage.https_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /api/user/login HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway ends the connection instead of waiting");
    // rustls answers a record it cannot read with an alert, or closes.
    assert!(
        read.is_err() || !answer.starts_with(b"HTTP/1.1 200"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart_and_a_bad_one_is_refused() {
    let stage = Stage::start().await;
    let old = stage.client("a.test", &stage.a.cert);
    let url = stage.url("a.test", "/api/user/login");
    assert_eq!(old.get(&url).send().await.unwrap().status(), 200);

    // A renewal: new connections get the new certificate within seconds.
    let renewed = certificate(&["a.test"], false);
    replace(&stage.files.join("a.key"), &renewed.key);
    replace(&stage.files.join("a.crt"), &renewed.cert);
    let new = stage.client("a.test", &renewed.cert);
    eventually(
        "the renewed certificate served",
        Duration::from_secs(10),
        || {
            let request = new.get(&url);
            async move { request.send().await.is_ok_and(|a| a.status() == 200) }
        },
    )
    .await;
    // The connection opened before the renewal goes on (the old client trusts only the old
    // certificate, so a new connection of its own would fail).
    assert_eq!(old.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        metric(&stage.metrics().await, "goms_tls_reloads_total"),
        1.0
    );

    // Bad replacements, each refused with the file named; the renewed certificate stays.
    let other = certificate(&["a.test"], false);
    let expired = certificate(&["a.test"], true);
    let crt = stage.files.join("a.crt");
    let key = stage.files.join("a.key");
    let cases: [(&str, &str, &str); 3] = [
        (
            "not a certificate\n",
            &renewed.key,
            "a.crt: no certificate in the file",
        ),
        (
            &other.cert,
            &renewed.key,
            "this key does not belong to the certificate",
        ),
        (
            &expired.cert,
            &expired.key,
            "a.crt: the certificate expired at 2020-01-02",
        ),
    ];
    for (refusals, (cert_text, key_text, logged)) in (1..).zip(cases) {
        replace(&key, key_text);
        replace(&crt, cert_text);
        stage
            .gateway
            .wait_for_line(logged, Duration::from_secs(10))
            .await;
        eventually("the refusal counted", Duration::from_secs(10), || async {
            metric(&stage.metrics().await, "goms_tls_reload_refusals_total") >= refusals as f64
        })
        .await;
        let fresh = stage.client("a.test", &renewed.cert);
        let answer = fresh.get(&url).send().await;
        assert_eq!(
            answer.unwrap().status(),
            200,
            "the renewed certificate stays"
        );
    }
}

#[tokio::test]
async fn a_client_that_stalls_in_the_handshake_is_cut_off_by_the_header_timeout() {
    let stage = Stage::start().await;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", stage.https_port))
        .await
        .unwrap();
    // The start of a TLS record (a handshake, TLS 1.0 framing) and then nothing.
    stream.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the gateway kept a stalled handshake open past 10 s"
    );
    // gateway.limits.headerTimeout is 2 s here.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

/// HTTP/2 by ALPN on the TLS listener. curl multiplexes 20 requests over one connection;
/// each is routed, balanced across both replicas like separate requests, answered with its
/// id, traced and recorded by the dashboard, and a POST's body arrives.
#[tokio::test]
async fn http2_streams_on_one_connection_are_routed_and_balanced_like_requests() {
    let stage = Stage::start().await;
    let _second = Goms::service(&stage._etcd, free_port(), &[]);
    wait_for_nodes(stage.admin_port, "user", 2).await;
    let emitted_before = metric(&stage.metrics().await, "goms_trace_events_emitted_total");
    let root = stage.files.join("a.crt").display().to_string();
    let resolve = format!("a.test:{}:127.0.0.1", stage.https_port);
    let url = stage.url("a.test", "/api/user/login");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--http2", "--parallel", "--parallel-max", "20"])
        .args(["--cacert", &root, "--resolve", &resolve])
        .args([
            "-w",
            "%{http_version} %{http_code} %{num_connects} %header{x-served-by} %header{x-request-id}\n",
        ]);
    for _ in 0..20 {
        curl.args(["-o", "/dev/null", &url]);
    }
    let output = curl.output().expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(answers.len(), 20, "{text}");
    assert!(
        answers
            .iter()
            .all(|a| a[0] == "2" && a[1] == "200" && !a[4].is_empty()),
        "every answer over HTTP/2, 200, with an id:\n{text}"
    );
    let connections: u32 = answers.iter().map(|a| a[2].parse::<u32>().unwrap()).sum();
    assert_eq!(
        connections, 1,
        "the 20 requests shared one connection:\n{text}"
    );
    let replicas: std::collections::HashSet<&str> = answers.iter().map(|a| a[3]).collect();
    assert_eq!(replicas.len(), 2, "both replicas served:\n{text}");

    let post = Command::new("curl")
        .args(["-sS", "--http2", "--cacert", &root, "--resolve", &resolve])
        .args(["-d", "username=test", "-d", "password=test", &url])
        .output()
        .expect("curl runs");
    let body = String::from_utf8_lossy(&post.stdout);
    assert!(
        body.contains("\"code\":0") && body.contains("test"),
        "{body}"
    );

    eventually("40 more trace events", Duration::from_secs(10), || async {
        metric(&stage.metrics().await, "goms_trace_events_emitted_total") >= emitted_before + 42.0
    })
    .await;
    let id = answers[0][4];
    let listed = text_of(http().get(format!(
        "http://127.0.0.1:{}/ui/api/requests?requestId={id}",
        stage.admin_port
    )))
    .await;
    assert!(listed.contains("\"method\":\"GET\""), "{listed}");
}
