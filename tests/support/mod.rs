//! Starts the real things the suites need: etcd in a container (testcontainers), and the
//! `goms` binary as child processes. Everything waits on a deadline and panics with what it
//! was waiting for; nothing sleeps to synchronise.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testcontainers::core::{CmdWaitFor, ExecCommand, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The key every test cluster shares.
pub const KEY: &str = "test-call-service-key";

pub mod es_standin;
pub mod trace_fixtures;

/// Default etcd image where a registry is reachable; `GOMS_ETCD_IMAGE` overrides it.
const DEFAULT_ETCD_IMAGE: &str = "quay.io/coreos/etcd:v3.5.17";

/// Polls `check` until it returns true or `timeout` passes; panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port nothing listens on right now, for a process the test starts to bind.
///
/// It is picked below the kernel's ephemeral range (32768 and up) and below the containers'
/// ports (30000 and up), for the reason [`container_host_port`] gives: an ephemeral port can
/// be taken by any outgoing connection between this check and the process's bind, and the
/// process then fails to start.
pub fn free_port() -> u16 {
    static PICKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    unbound_port_in(20_000, 10_000, 5_000, &PICKS)
}

/// A host port for a container to publish on, which stays its own for the container's life.
///
/// It is picked below the kernel's ephemeral range (32768 and up), so no outgoing connection
/// of a gateway or a test can take it between this check and Docker's bind; Docker itself
/// does not look whether another process holds a port before it hands it to docker-proxy.
pub fn container_host_port() -> u16 {
    static PICKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    unbound_port_in(30_000, 2_700, 2_000, &PICKS)
}

/// A port of `low..low + span` that nothing is bound to now, out of up to `tries` picks.
/// The picks are spread by the time, the process id and `picks` (the caller's count), so
/// that tests running at once rarely try the same port.
fn unbound_port_in(
    low: u16,
    span: u16,
    tries: usize,
    picks: &std::sync::atomic::AtomicUsize,
) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as usize
        + std::process::id() as usize * 31;
    let free = |port: u16| std::net::TcpListener::bind(("0.0.0.0", port)).is_ok();
    (0..tries)
        .map(|n| n + picks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 104_729)
        .map(|n| low + ((seed + n * 7_919) % usize::from(span)) as u16)
        .find(|&port| free(port))
        .unwrap_or_else(|| panic!("no free port between {low} and {}", low + span - 1))
}

/// Whether a container failed to start only because its host port was taken meanwhile.
fn port_taken(error: &testcontainers::TestcontainersError) -> bool {
    error.to_string().contains("port is already allocated")
}

/// How often a container's start is tried when its host port keeps being taken.
const CONTAINER_START_TRIES: usize = 5;

/// `name:tag` as testcontainers wants it; a registry port is not a tag.
pub fn split_image(reference: &str) -> (String, String) {
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name.to_string(), tag.to_string()),
        _ => (reference.to_string(), "latest".to_string()),
    }
}

/// A real etcd in a container, published on a fixed host port so that it can be stopped
/// and started (or replaced by an empty one) without clients changing address.
pub struct Etcd {
    pub port: u16,
    container: Option<ContainerAsync<GenericImage>>,
}

/// A member of an etcd cluster: the cluster's network, the member's name on it (also its
/// hostname), and the `ETCD_INITIAL_CLUSTER` every member shares.
struct EtcdMember<'a> {
    network: &'a str,
    name: &'a str,
    initial_cluster: &'a str,
}

impl Etcd {
    pub async fn start() -> Etcd {
        for _ in 1..CONTAINER_START_TRIES {
            let port = container_host_port();
            match Self::try_launch(port, None).await {
                Ok(container) => {
                    return Etcd {
                        port,
                        container: Some(container),
                    }
                }
                Err(error) if port_taken(&error) => continue,
                Err(error) => Self::failed(error),
            }
        }
        let port = container_host_port();
        let container = Self::launch(port).await;
        Etcd {
            port,
            container: Some(container),
        }
    }

    /// An etcd cluster of `size` members on a network of their own, each published on a host
    /// port of its own; a client lists every member's [`Etcd::endpoint`]. The members start
    /// together: none answers before a quorum of them has met.
    pub async fn start_cluster(size: usize) -> Vec<Etcd> {
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let cluster = format!(
            "goms-etcd-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let names: Vec<String> = (1..=size).map(|n| format!("{cluster}-{n}")).collect();
        let initial_cluster = names
            .iter()
            .map(|name| format!("{name}=http://{name}:2380"))
            .collect::<Vec<_>>()
            .join(",");
        let starts = names.iter().map(|name| {
            let port = container_host_port();
            let member = EtcdMember {
                network: &cluster,
                name,
                initial_cluster: &initial_cluster,
            };
            async move {
                match Self::try_launch(port, Some(member)).await {
                    Ok(container) => Etcd {
                        port,
                        container: Some(container),
                    },
                    Err(error) => Self::failed(error),
                }
            }
        });
        futures::future::join_all(starts).await
    }

    /// The endpoints of `members`, as `etcdAddr` lists them.
    pub fn endpoints(members: &[Etcd]) -> String {
        members
            .iter()
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts etcd on `port`, which it must keep: a port taken meanwhile is waited out.
    async fn launch(port: u16) -> ContainerAsync<GenericImage> {
        let mut tries = 1;
        loop {
            match Self::try_launch(port, None).await {
                Ok(container) => return container,
                Err(error) if port_taken(&error) && tries < CONTAINER_START_TRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => Self::failed(error),
            }
        }
    }

    fn failed(error: testcontainers::TestcontainersError) -> ! {
        let reference =
            std::env::var("GOMS_ETCD_IMAGE").unwrap_or_else(|_| DEFAULT_ETCD_IMAGE.to_string());
        panic!("etcd container `{reference}` did not start (set GOMS_ETCD_IMAGE, or run scripts/test.sh which builds offline images): {error}")
    }

    async fn try_launch(
        port: u16,
        member: Option<EtcdMember<'_>>,
    ) -> Result<ContainerAsync<GenericImage>, testcontainers::TestcontainersError> {
        let reference =
            std::env::var("GOMS_ETCD_IMAGE").unwrap_or_else(|_| DEFAULT_ETCD_IMAGE.to_string());
        let (name, tag) = split_image(&reference);
        let request = GenericImage::new(name, tag)
            .with_wait_for(WaitFor::message_on_stderr("ready to serve client requests"))
            .with_exposed_port(2379.tcp())
            .with_env_var("ETCD_DATA_DIR", "/tmp/etcd-data")
            .with_env_var("ETCD_LISTEN_CLIENT_URLS", "http://0.0.0.0:2379")
            .with_env_var("ETCD_ADVERTISE_CLIENT_URLS", "http://127.0.0.1:2379")
            .with_mapped_port(port, 2379.tcp())
            .with_startup_timeout(Duration::from_secs(60));
        let request = match member {
            None => request
                .with_env_var("ETCD_NAME", "default")
                .with_env_var("ETCD_LISTEN_PEER_URLS", "http://127.0.0.1:2380")
                .with_env_var("ETCD_INITIAL_ADVERTISE_PEER_URLS", "http://127.0.0.1:2380")
                .with_env_var("ETCD_INITIAL_CLUSTER", "default=http://127.0.0.1:2380"),
            Some(member) => request
                .with_network(member.network)
                .with_container_name(member.name)
                .with_hostname(member.name)
                .with_env_var("ETCD_NAME", member.name)
                .with_env_var("ETCD_LISTEN_PEER_URLS", "http://0.0.0.0:2380")
                .with_env_var(
                    "ETCD_INITIAL_ADVERTISE_PEER_URLS",
                    format!("http://{}:2380", member.name),
                )
                .with_env_var("ETCD_INITIAL_CLUSTER", member.initial_cluster)
                .with_env_var("ETCD_INITIAL_CLUSTER_STATE", "new")
                .with_env_var("ETCD_INITIAL_CLUSTER_TOKEN", member.network),
        };
        request.start().await
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connect to test etcd")
    }

    /// Stops the container; its data stays for [`Etcd::resume`].
    pub async fn pause(&self) {
        let container = self.container.as_ref().expect("etcd running");
        container
            .stop_with_timeout(Some(1))
            .await
            .expect("stop etcd");
    }

    /// Starts the stopped container again and waits until it answers.
    pub async fn resume(&self) {
        let container = self.container.as_ref().expect("etcd exists");
        container.start().await.expect("start etcd again");
        self.wait_ready().await;
    }

    /// Replaces etcd by a fresh one with no data on the same port: every lease and key is gone.
    pub async fn replace_with_empty(&mut self) {
        if let Some(old) = self.container.take() {
            old.rm().await.expect("remove etcd");
        }
        self.container = Some(Self::launch(self.port).await);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let endpoint = self.endpoint();
        eventually("etcd answers", Duration::from_secs(30), || {
            let endpoint = endpoint.clone();
            async move {
                match etcd_client::Client::connect([endpoint], None).await {
                    Ok(mut client) => client.get("probe", None).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
    }
}

/// A `goms` child process whose output is captured line by line.
pub struct Goms {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads that read its stdout and stderr into `lines`; done once both pipes closed.
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The port it bound, for processes started on port 0.
    port: Option<u16>,
    /// Each process spools trace events into its own folder, removed with it.
    _spool: tempfile::TempDir,
}

impl Goms {
    /// Runs `goms <args>` with the test key, no config file, and text logs.
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Goms {
        Goms::spawn_unsetting(name, args, env, &[])
    }

    /// As [`Goms::spawn`], with the variables in `unset` taken out of its environment (to
    /// try a default the suites otherwise override).
    pub fn spawn_unsetting(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> Goms {
        Goms::spawn_full(name, None, args, env, unset)
    }

    /// As [`Goms::spawn`], reading `config` (a goms.yml) for what the environment cannot
    /// say, such as lists of tables.
    pub fn spawn_configured(
        name: &str,
        config: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Goms {
        Goms::spawn_full(name, Some(config), args, env, &[])
    }

    fn spawn_full(
        name: &str,
        config: Option<&std::path::Path>,
        args: &[&str],
        env: &[(&str, &str)],
        unset: &[&str],
    ) -> Goms {
        let spool = tempfile::tempdir().expect("spool dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_goms"));
        let config = config.map_or("/nonexistent/goms.yml".into(), |path| {
            path.display().to_string()
        });
        command
            .args(["--config", &config, "--log-level", "info"])
            .args(args)
            .env("GOMS__CALL_SERVICE_KEY", KEY)
            .env("GOMS__GATEWAY__DRAIN_TIMEOUT", "1s")
            .env("GOMS__GATEWAY__HEALTH_CHECK_INTERVAL", "500ms")
            // Every gateway of a test run gets an admin listener of its own.
            .env("GOMS__GATEWAY__ADMIN_ADDR", "127.0.0.1:0")
            // No broker unless a test names one: nothing reaches a developer's local RabbitMQ.
            .env("GOMS__AMQP_ADDR", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("GOMS__TRACE__SPOOL_DIR", spool.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        for key in unset {
            command.env_remove(key);
        }
        let mut child = command.spawn().expect("spawn goms binary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            let label = name.to_string();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("GOMS_TEST_ECHO").is_some() {
                        eprintln!("[{label}] {line}");
                    }
                    lines.lock().unwrap().push(line);
                }
            }));
        }
        Goms {
            name: name.to_string(),
            child,
            lines,
            readers,
            port: None,
            _spool: spool,
        }
    }

    pub fn service(etcd: &Etcd, port: u16, extra: &[&str]) -> Goms {
        let port = port.to_string();
        let mut args = vec![
            "service",
            "--name",
            "user",
            "--http-port",
            &port,
            "--etcd-addr",
        ];
        let endpoint = etcd.endpoint();
        args.push(&endpoint);
        args.extend_from_slice(extra);
        Goms::spawn(&format!("user:{port}"), &args, &[])
    }

    /// A gateway on a port the system picks; [`Goms::port`] is the port it bound.
    pub async fn gateway(etcd: &Etcd, routes: &std::path::Path, extra: &[&str]) -> Goms {
        Goms::gateway_with(&etcd.endpoint(), routes, extra, &[]).await
    }

    /// A gateway on any etcd endpoint (a proxy in front of etcd, say) with extra env. It
    /// binds port 0 and the test reads the port from its log, so no two tests race for one.
    pub async fn gateway_with(
        etcd_endpoint: &str,
        routes: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Goms {
        let routes = routes.display().to_string();
        let mut args = vec![
            "gateway",
            "--http-port",
            "0",
            "--etcd-addr",
            etcd_endpoint,
            "--routes",
            &routes,
        ];
        args.extend_from_slice(extra);
        Goms::spawn("gateway", &args, env).serving().await
    }

    /// Waits until this gateway serves and notes the port it logged (see [`Goms::port`]).
    pub async fn serving(self) -> Goms {
        let mut gateway = self;
        let marker = "Http Listen on port: ";
        gateway.wait_for_line(marker, Duration::from_secs(30)).await;
        let output = gateway.output();
        let port = output
            .lines()
            .find_map(|line| line.split(marker).nth(1))
            .and_then(|rest| rest.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port after {marker:?} in:\n{output}"));
        gateway.name = format!("gateway:{port}");
        gateway.port = Some(port);
        gateway
    }

    /// The folder the process's spool subfolders go in.
    pub fn spool_root(&self) -> &std::path::Path {
        self._spool.path()
    }

    /// The port a gateway bound.
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or_else(|| panic!("{} logged no port of its own", self.name))
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn has_line(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    pub async fn wait_for_line(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.has_line(needle) {
            if Instant::now() > deadline {
                panic!(
                    "{}: no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address the process logged after `marker`, e.g. `admin (/cluster, /metrics) on `.
    pub fn logged_addr(&self, marker: &str) -> String {
        let output = self.output();
        let line = output
            .lines()
            .find(|line| line.contains(marker))
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{output}"));
        let after = line.split(marker).nth(1).unwrap();
        after.split_whitespace().next().unwrap().to_string()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: the process gets no chance to deregister.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to exit; returns its exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        self.exit_status(timeout).await
    }

    /// Waits for the process to exit by itself; panics after `timeout`. Once it returns, every
    /// line the process wrote is in [`Goms::output`]: the exit comes before the readers have
    /// taken the last lines out of the pipes (seen: a consumer's final summary missing).
    pub async fn exit_status(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait child") {
                // A child of its own that inherited the pipes would keep them open: then
                // the output is what was read by the deadline.
                while !self.readers.iter().all(|reader| reader.is_finished())
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Goms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the suites' clients keep an idle connection: less than the gateway's idle timeout
/// (`gateway.limits.idleTimeout`, 60 s), so that a client never sends a request into a
/// connection the gateway is closing.
pub const CLIENT_IDLE: Duration = Duration::from_secs(30);

/// An HTTP client that never uses a proxy from the environment.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(CLIENT_IDLE)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build HTTP client")
}

/// Sends a request that must be answered and returns its JSON body.
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    let response = request.send().await.expect("an answer");
    response.json().await.expect("a JSON body")
}

/// Sends a request that must be answered and returns its body as text.
pub async fn text_of(request: reqwest::RequestBuilder) -> String {
    let response = request.send().await.expect("an answer");
    response.text().await.expect("a text body")
}

/// Waits until the gateway's `/cluster` lists `count` nodes of `service`.
pub async fn wait_for_nodes(gateway_port: u16, service: &str, count: usize) {
    let client = http();
    let url = format!("http://127.0.0.1:{gateway_port}/cluster");
    eventually(
        &format!("{count} `{service}` nodes in {url}"),
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let Ok(response) = client.get(&url).send().await else {
                    return false;
                };
                let Ok(document) = response.json::<serde_json::Value>().await else {
                    return false;
                };
                let nodes = document["services"][service]["NodeDetail"]
                    .as_array()
                    .map(|nodes| {
                        nodes
                            .iter()
                            .filter(|n| n["healthy"].as_bool() == Some(true))
                            .count()
                    })
                    .unwrap_or(0);
                nodes == count
            }
        },
    )
    .await;
}

/// The `NodeDetail` entry of replica `id` of `service` in the gateway's `/cluster`.
pub async fn node_detail(gateway_port: u16, service: &str, id: &str) -> serde_json::Value {
    let cluster = json_of(http().get(format!("http://127.0.0.1:{gateway_port}/cluster"))).await;
    cluster["services"][service]["NodeDetail"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned())
        .unwrap_or_else(|| panic!("{id} missing from /cluster: {cluster}"))
}

/// Registers a test's own server as a replica of `service`, as a node registers: its record
/// under `/goms/services/{service}/{id}`, on a lease of 60 s.
pub async fn register_replica(
    etcd: &Etcd,
    service: &str,
    id: &str,
    addr: std::net::SocketAddr,
    zone: &str,
) {
    let mut client = etcd.client().await;
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let value = serde_json::json!({
        "id": id, "service": service, "http": addr.to_string(), "version": "test",
        "weight": 1, "zone": zone, "started_at": goms::config::now_rfc3339()
    });
    client
        .put(
            format!("/goms/services/{service}/{id}"),
            value.to_string(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("register the replica in etcd");
}

/// The value of the metric `name` in a Prometheus text `exposition`; panics when absent.
pub fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{exposition}"))
}

/// Reads until the peer closes the connection; panics when it is still open after `within`.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
    assert!(
        read.is_ok(),
        "the connection was still open after {within:?}; got {:?}",
        String::from_utf8_lossy(&received)
    );
    received
}

/// Writes a route file into a temp folder and returns both (keep the folder alive).
pub fn route_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let folder = tempfile::tempdir().expect("temp dir");
    let path = folder.path().join("services.yml");
    std::fs::write(&path, text).expect("write route file");
    (folder, path)
}

pub const ROUTES: &str = "services:\n  user:\n    register: \"/register\"\n    login: \"/login\"\n  order:\n    submit: \"/order/submit\"\n";

/// A TCP forwarder to a local port that the test can cut (close every connection and
/// refuse new ones) and restore: a network partition between one process and etcd.
pub struct TcpCut {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TcpCut {
    pub async fn start(target_port: u16) -> TcpCut {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (flag, tasks) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(task);
            }
        });
        TcpCut {
            port,
            cut,
            connections,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Default RabbitMQ image where a registry is reachable; `GOMS_RABBITMQ_IMAGE` overrides it.
const DEFAULT_RABBITMQ_IMAGE: &str = "rabbitmq:3.13-management";

/// A real RabbitMQ in a container on a fixed host port, so it can be stopped and started.
pub struct RabbitMq {
    pub port: u16,
    container: ContainerAsync<GenericImage>,
}

/// A node of a RabbitMQ cluster: the cluster's network and the node's name on it, which is
/// also its hostname (Erlang names the node `rabbit@{name}`).
struct ClusterMember<'a> {
    network: &'a str,
    name: &'a str,
}

/// The Erlang cookie the nodes of a test cluster share.
const CLUSTER_COOKIE: &str = "goms-test-cluster-cookie";

impl RabbitMq {
    pub async fn start() -> RabbitMq {
        RabbitMq::launch(None).await
    }

    /// A RabbitMQ cluster of `size` nodes on a network of their own: the first starts alone,
    /// and each other joins it (`rabbitmqctl join_cluster`), so that quorum queues replicate
    /// across all of them. Each node publishes its AMQP port as [`RabbitMq::start`]'s does.
    pub async fn start_cluster(size: usize) -> Vec<RabbitMq> {
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let cluster = format!(
            "goms-rmq-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let first = format!("rabbit@{cluster}-1");
        let mut nodes = Vec::with_capacity(size);
        for n in 1..=size {
            let name = format!("{cluster}-{n}");
            let member = ClusterMember {
                network: &cluster,
                name: &name,
            };
            let node = RabbitMq::launch(Some(member)).await;
            if n > 1 {
                node.rabbitmqctl(&["stop_app"]).await;
                node.rabbitmqctl(&["join_cluster", &first]).await;
                node.rabbitmqctl(&["start_app"]).await;
                node.wait_ready().await;
            }
            nodes.push(node);
        }
        nodes
    }

    async fn launch(member: Option<ClusterMember<'_>>) -> RabbitMq {
        let reference = std::env::var("GOMS_RABBITMQ_IMAGE")
            .unwrap_or_else(|_| DEFAULT_RABBITMQ_IMAGE.to_string());
        let (name, tag) = split_image(&reference);
        let mut tries = 1;
        let (port, container) = loop {
            let port = container_host_port();
            let request = GenericImage::new(name.clone(), tag.clone())
                .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                .with_exposed_port(5672.tcp())
                .with_mapped_port(port, 5672.tcp())
                .with_startup_timeout(Duration::from_secs(120));
            let request = match &member {
                None => request,
                Some(member) => request
                    .with_network(member.network)
                    .with_container_name(member.name)
                    .with_hostname(member.name)
                    // The image's own command, after the cookie every node and its
                    // rabbitmqctl must share.
                    .with_cmd([
                        "sh",
                        "-c",
                        &format!(
                            "chmod 600 \"$HOME/.erlang.cookie\" 2>/dev/null; \
                             printf %s {CLUSTER_COOKIE} > \"$HOME/.erlang.cookie\" \
                             && chmod 400 \"$HOME/.erlang.cookie\" \
                             && exec /usr/lib/rabbitmq/bin/rabbitmq-server"
                        ),
                    ]),
            };
            let started = request.start().await;
            match started {
                Ok(container) => break (port, container),
                Err(error) if port_taken(&error) && tries < CONTAINER_START_TRIES => tries += 1,
                Err(error) => panic!("RabbitMQ container `{reference}` did not start (set GOMS_RABBITMQ_IMAGE, or run scripts/test.sh): {error}"),
            }
        };
        let broker = RabbitMq { port, container };
        broker.wait_ready().await;
        broker
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The URLs of `nodes`, as `amqpAddr` lists them.
    pub fn urls(nodes: &[RabbitMq]) -> String {
        nodes
            .iter()
            .map(RabbitMq::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub async fn pause(&self) {
        self.container
            .stop_with_timeout(Some(10))
            .await
            .expect("stop RabbitMQ");
    }

    pub async fn resume(&self) {
        self.container.start().await.expect("start RabbitMQ again");
        self.wait_ready().await;
    }

    /// Raises RabbitMQ's memory alarm (a high watermark of 0), as memory or disk running
    /// short would: the broker blocks every connection that publishes until it clears.
    pub async fn block_publishers(&self) {
        self.rabbitmqctl(&["set_vm_memory_high_watermark", "0"])
            .await;
    }

    /// Clears the alarm of [`RabbitMq::block_publishers`] (0.4 is RabbitMQ's default).
    pub async fn unblock_publishers(&self) {
        self.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
            .await;
    }

    async fn rabbitmqctl(&self, args: &[&str]) -> String {
        let command = ExecCommand::new(std::iter::once("rabbitmqctl").chain(args.iter().copied()))
            .with_cmd_ready_condition(CmdWaitFor::exit_code(0));
        let mut run = self
            .container
            .exec(command)
            .await
            .unwrap_or_else(|error| panic!("rabbitmqctl {args:?}: {error}"));
        let stdout = run.stdout_to_vec().await.unwrap_or_default();
        String::from_utf8_lossy(&stdout).into_owned()
    }

    /// The type RabbitMQ reports for `queue` (`classic`, `quorum`), and the nodes of its
    /// cluster that run, as this node sees them.
    pub async fn queue_type_and_running_nodes(&self, queue: &str) -> (String, usize) {
        let queues = self
            .rabbitmqctl(&["list_queues", "name", "type", "--formatter", "json"])
            .await;
        let queues: serde_json::Value = serde_json::from_str(&queues).unwrap_or_default();
        let queue_type = queues
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == queue)
            .and_then(|q| q["type"].as_str())
            .unwrap_or_default()
            .to_string();
        let status = self
            .rabbitmqctl(&["cluster_status", "--formatter", "json"])
            .await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        let running = status["running_nodes"].as_array().map_or(0, Vec::len);
        (queue_type, running)
    }

    async fn wait_ready(&self) {
        let url = self.url();
        eventually(
            "RabbitMQ accepts AMQP connections",
            Duration::from_secs(90),
            || {
                let url = url.clone();
                async move {
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                        .await
                        .is_ok()
                }
            },
        )
        .await;
    }

    pub async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let connection =
            lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default())
                .await
                .expect("connect to test RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        (connection, channel)
    }

    /// Messages waiting in `queue` (declared by goms with its dead-letter arguments); `None`
    /// when the queue does not exist, so that "drained" never passes without a queue.
    pub async fn depth(&self, queue: &str) -> Option<u32> {
        let (_connection, channel) = self.channel().await;
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
            .await
            .ok()
            .map(|q| q.message_count())
    }
}
