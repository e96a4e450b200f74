//! The route file (`config/services.yml`): the Go original's `services -> route name -> path` map,
//! plus an extended per-route form, parsed into the table the gateway matches against.
//!
//! Validation happens while deserialising, so every refusal carries the YAML position of
//! the offending node (`file:line: reason`), which is what `check-config` prints and what
//! the gateway logs when a live edit is refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::error::ConfigError;
use super::policy::{Balance, RateLimitPolicy, RateLimitSetting, ServicePolicy, SETTING_KEYS};

/// The whole route file: one top-level key, `services`, exactly as goms wrote it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    pub services: ServiceRoutes,
}

/// `service name -> its routes and settings`, sorted by name, duplicates refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceRoutes(pub BTreeMap<String, ServiceSpec>);

/// One service of the route file: `route name -> route`, and the service's settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSpec {
    pub routes: BTreeMap<String, RouteSpec>,
    pub policy: ServicePolicy,
}

/// One route as written: either the Go original's short form (`login: "/login"`) or the
/// extended map.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Path on the replica, always starting with `/`.
    pub path: String,
    /// Allowed methods; `None` allows every method, as the Go original did.
    pub methods: Option<Vec<String>>,
    /// Per-attempt upstream timeout; `None` takes the gateway default.
    pub timeout: Option<Duration>,
    /// Extra attempts after the first; `None` takes the gateway default (2).
    pub retries: Option<u32>,
    /// Largest request body, in bytes; `None` takes `gateway.limits.bodyBytes` (10 MiB).
    pub max_body_bytes: Option<u64>,
    /// Body rewrite before forwarding.
    pub transform: Transform,
    /// The route's own rate limit: `None` takes the service's, `Some(None)` is
    /// `rateLimit: false` (none, whatever the service sets).
    pub rate_limit: Option<Option<RateLimitPolicy>>,
    /// The route's own way to pick a replica; `None` takes the service's.
    pub balance: Option<Balance>,
}

/// How the gateway rewrites a request body before forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// Forward the body untouched (default).
    #[default]
    None,
    /// Re-encode `application/x-www-form-urlencoded` bodies as JSON, as the Go original did.
    Json,
}

/// Upper bound on `retries`: more attempts than this only multiply load during an outage.
const MAX_RETRIES: u32 = 10;

const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendedRoute {
    path: RoutePath,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    timeout: Option<DurationText>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default, rename = "maxBodyBytes")]
    max_body_bytes: Option<u64>,
    #[serde(default)]
    transform: Transform,
    #[serde(default, rename = "rateLimit")]
    rate_limit: Option<RateLimitSetting>,
    #[serde(default)]
    balance: Option<Balance>,
}

/// A route path, refused unless it starts with `/`.
struct RoutePath(String);

impl<'de> Deserialize<'de> for RoutePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        check_path(&path).map_err(de::Error::custom)?;
        Ok(RoutePath(path))
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("route path `{path}` must start with `/`"));
    }
    if path.contains(char::is_whitespace) || path.contains('?') || path.contains('#') {
        return Err(format!(
            "route path `{path}` must be a plain path (no spaces, `?` or `#`)"
        ));
    }
    if http::uri::PathAndQuery::try_from(path).is_err() {
        return Err(format!(
            "route path `{path}` has characters a request target cannot carry"
        ));
    }
    Ok(())
}

/// A duration written as `250ms`, `2s`, `1m` or a bare number of milliseconds.
pub struct DurationText(pub Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Millis(ms) => Ok(DurationText(Duration::from_millis(ms))),
            Raw::Text(text) => parse_duration(&text)
                .map(DurationText)
                .map_err(de::Error::custom),
        }
    }
}

/// Parses `250ms`, `2s`, `1m`, `1h` or bare milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (write 500ms, 2s or 1m)"))?;
    match unit.trim() {
        "" | "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        "h" => Ok(Duration::from_secs(value * 3600)),
        other => Err(format!(
            "unknown duration unit `{other}` in `{text}` (use ms, s, m or h)"
        )),
    }
}

impl<'de> Deserialize<'de> for RouteSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RouteSpecVisitor)
    }
}

struct RouteSpecVisitor;

impl<'de> Visitor<'de> for RouteSpecVisitor {
    type Value = RouteSpec;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a path such as \"/login\" or a map {path, methods, timeout, retries, transform}",
        )
    }

    fn visit_str<E: de::Error>(self, path: &str) -> Result<RouteSpec, E> {
        check_path(path).map_err(E::custom)?;
        Ok(RouteSpec {
            path: path.to_string(),
            methods: None,
            timeout: None,
            retries: None,
            max_body_bytes: None,
            transform: Transform::None,
            rate_limit: None,
            balance: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RouteSpec, A::Error> {
        let route = ExtendedRoute::deserialize(de::value::MapAccessDeserializer::new(map))?;
        let methods = route
            .methods
            .map(|methods| normalise_methods(methods).map_err(de::Error::custom))
            .transpose()?;
        if let Some(retries) = route.retries {
            if retries > MAX_RETRIES {
                return Err(de::Error::custom(format!(
                    "retries {retries} is more than the maximum of {MAX_RETRIES}"
                )));
            }
        }
        Ok(RouteSpec {
            path: route.path.0,
            methods,
            timeout: route.timeout.map(|t| t.0),
            retries: route.retries,
            max_body_bytes: route.max_body_bytes,
            transform: route.transform,
            rate_limit: route.rate_limit.map(|setting| setting.0),
            balance: route.balance,
        })
    }
}

fn normalise_methods(methods: Vec<String>) -> Result<Vec<String>, String> {
    if methods.is_empty() {
        return Err("`methods` is empty: list at least one method or leave the key out".into());
    }
    methods
        .into_iter()
        .map(|method| {
            let upper = method.to_ascii_uppercase();
            if KNOWN_METHODS.contains(&upper.as_str()) {
                Ok(upper)
            } else {
                Err(format!("unknown HTTP method `{method}`"))
            }
        })
        .collect()
}

impl<'de> Deserialize<'de> for ServiceRoutes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ServicesVisitor)
    }
}

struct ServicesVisitor;

impl<'de> Visitor<'de> for ServicesVisitor {
    type Value = ServiceRoutes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map of service name to its routes")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ServiceRoutes, A::Error> {
        let mut services = BTreeMap::new();
        while let Some(service) = map.next_key_seed(UniqueName {
            kind: "service",
            taken: &|name: &str| {
                services
                    .contains_key(name)
                    .then(|| format!("duplicate service `{name}`"))
            },
        })? {
            let routes = map.next_value_seed(RoutesSeed { service: &service })?;
            if let Some((name, other)) = grpc_claimed_twice(&services, &service, &routes) {
                return Err(de::Error::custom(format!(
                    "gRPC name `{name}` is served by both `{other}` and `{service}`: a gRPC \
                     call must have one service to go to"
                )));
            }
            services.insert(service, routes);
        }
        Ok(ServiceRoutes(services))
    }
}

/// A gRPC name `spec` lists that an earlier service listed too, with that service.
fn grpc_claimed_twice<'a>(
    earlier: &'a BTreeMap<String, ServiceSpec>,
    service: &str,
    spec: &'a ServiceSpec,
) -> Option<(&'a str, &'a str)> {
    spec.policy.grpc.iter().find_map(|name| {
        earlier
            .iter()
            .filter(|(other, _)| other.as_str() != service)
            .find(|(_, other)| other.policy.grpc.contains(name))
            .map(|(other, _)| (name.as_str(), other.as_str()))
    })
}

/// Deserialises one service's routes, knowing the service's name for error messages.
struct RoutesSeed<'a> {
    service: &'a str,
}

impl<'de> de::DeserializeSeed<'de> for RoutesSeed<'_> {
    type Value = ServiceSpec;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RoutesSeed<'_> {
    type Value = ServiceSpec;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "a map of route name to path for service `{}`",
            self.service
        )
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "service `{}` has no routes: add at least one `name: \"/path\"`",
            self.service
        )))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut routes = BTreeMap::new();
        let mut policy = ServicePolicy::default();
        let mut settings: Vec<String> = Vec::new();
        let service = self.service;
        while let Some(name) = map.next_key_seed(UniqueName {
            kind: "route",
            taken: &|name: &str| {
                if settings.iter().any(|s| s == name) {
                    Some(format!("duplicate setting `{name}` in service `{service}`"))
                } else {
                    routes
                        .contains_key(name)
                        .then(|| format!("duplicate route `{name}` in service `{service}`"))
                }
            },
        })? {
            if SETTING_KEYS.contains(&name.as_str()) {
                map.next_value_seed(SettingSeed {
                    key: &name,
                    policy: &mut policy,
                })?;
                settings.push(name);
            } else {
                routes.insert(name, map.next_value::<RouteSpec>()?);
            }
        }
        if routes.is_empty() && policy.grpc.is_empty() {
            return Err(de::Error::custom(format!(
                "service `{}` has no routes: add at least one `name: \"/path\"`",
                self.service
            )));
        }
        Ok(ServiceSpec { routes, policy })
    }
}

/// Reads the value of one of a service's settings into its [`ServicePolicy`].
struct SettingSeed<'a> {
    key: &'a str,
    policy: &'a mut ServicePolicy,
}

impl<'de> de::DeserializeSeed<'de> for SettingSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.policy.set(self.key, deserializer)
    }
}

/// A map key checked while it is read, so a refusal points at the key's own line.
struct UniqueName<'a> {
    kind: &'static str,
    /// Returns the refusal when the name was already used.
    taken: &'a dyn Fn(&str) -> Option<String>,
}

impl<'de> de::DeserializeSeed<'de> for UniqueName<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let name = String::deserialize(deserializer)?;
        check_name(self.kind, &name).map_err(de::Error::custom)?;
        match (self.taken)(&name) {
            Some(refusal) => Err(de::Error::custom(refusal)),
            None => Ok(name),
        }
    }
}

/// Names become URL segments (`/api/{service}/{route}`): keep them to what needs no escaping.
fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !name.starts_with('/')
        && !name.ends_with('/');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{kind} name `{name}` may use only letters, digits, `-`, `_`, `.` and inner `/`"
        ))
    }
}

/// Reads and validates a route file.
pub fn load_routes_file(path: &Path) -> Result<ServiceRoutes, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_routes(path, &text)
}

/// Validates route file text; `path` is only used in error messages.
pub fn parse_routes(path: &Path, text: &str) -> Result<ServiceRoutes, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::Whole {
            path: path.to_path_buf(),
            reason: "file is empty: it needs a top-level `services:` map".into(),
        });
    }
    let file: RoutesFile = serde_norway::from_str(text)
        .map_err(|error| point_at_duplicate(ConfigError::from_yaml(path, text, error), text))?;
    Ok(file.services)
}

/// The YAML parser reports a duplicate key at the start of its map; users want the line of
/// the second occurrence, found by scanning the map's lines for the key at its indentation.
fn point_at_duplicate(error: ConfigError, text: &str) -> ConfigError {
    let ConfigError::Invalid {
        path,
        line,
        column,
        reason,
    } = error
    else {
        return error;
    };
    let duplicate = reason
        .split_once("duplicate ")
        .and_then(|(_, rest)| rest.split_once('`'))
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(name, _)| name.to_string());
    let Some(name) = duplicate else {
        return ConfigError::Invalid {
            path,
            line,
            column,
            reason,
        };
    };
    let indent = column.saturating_sub(1);
    let occurrences: Vec<usize> = text
        .lines()
        .enumerate()
        .skip(line.saturating_sub(1))
        .take_while(|(_, l)| {
            let own_indent = l.len() - l.trim_start().len();
            l.trim().is_empty() || l.trim_start().starts_with('#') || own_indent >= indent
        })
        .filter(|(_, l)| {
            let own_indent = l.len() - l.trim_start().len();
            let key = l.trim_start().trim_start_matches(['"', '\'']);
            own_indent == indent
                && key.starts_with(name.as_str())
                && key[name.len()..]
                    .trim_start_matches(['"', '\''])
                    .starts_with(':')
        })
        .map(|(index, _)| index + 1)
        .collect();
    let line = occurrences.get(1).copied().unwrap_or(line);
    ConfigError::Invalid {
        path,
        line,
        column: indent + 1,
        reason,
    }
}

/// A route resolved with the gateway's defaults, ready to match requests.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<str>,
    pub name: String,
    /// `service/name`, the route's name in the dashboard's traffic.
    pub key: Arc<str>,
    pub path: String,
    /// `path` as the request target sent upstream when the client sent no query string,
    /// parsed once here instead of on every request. `None` only for a path that cannot be a
    /// target, which the route file's check refuses.
    pub target: Option<http::Uri>,
    pub methods: Option<Vec<http::Method>>,
    pub timeout: Duration,
    pub retries: u32,
    /// Largest request body, in bytes (413 past it).
    pub max_body_bytes: u64,
    pub transform: Transform,
    /// The settings of the route's service, shared by all its routes.
    pub policy: Arc<ServicePolicy>,
    /// The route's rate limit: its own, or else its service's.
    pub rate_limit: Option<RateLimitPolicy>,
    /// How the route picks a replica: its own way, or else its service's.
    pub balance: Balance,
    /// Whether this is a service's gRPC route: calls keep their path and go to the replicas'
    /// `rpc` address over h2c.
    pub grpc: bool,
}

impl Route {
    pub fn allows(&self, method: &http::Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == method))
    }
}

/// Defaults applied to routes that do not set their own.
#[derive(Debug, Clone, Copy)]
pub struct RouteDefaults {
    pub timeout: Duration,
    pub retries: u32,
    pub max_body_bytes: u64,
}

/// The table the gateway matches `/api/{service}/{route}` against, and gRPC calls'
/// `/{package.Service}/{Method}`.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<String, HashMap<String, Arc<Route>>>,
    /// Each name a service's `grpc:` lists, with that service's gRPC route; longest first,
    /// so that a service wins over a package that contains it.
    grpc: Vec<(String, Arc<Route>)>,
}

/// The route name of a service's gRPC calls, as the dashboard and the metrics show it. No
/// HTTP route can take it: `grpc` is a setting's key.
pub const GRPC_ROUTE_NAME: &str = "grpc";

impl RouteTable {
    pub fn build(spec: &ServiceRoutes, defaults: RouteDefaults) -> Self {
        let services = spec
            .0
            .iter()
            .map(|(service, spec)| {
                let service_name: Arc<str> = Arc::from(service.as_str());
                let policy = Arc::new(spec.policy.clone());
                let routes = spec
                    .routes
                    .iter()
                    .map(|(name, route)| {
                        let resolved = Route {
                            service: service_name.clone(),
                            name: name.clone(),
                            key: Arc::from(format!("{service}/{name}")),
                            path: route.path.clone(),
                            target: http::Uri::try_from(route.path.as_str()).ok(),
                            methods: route.methods.as_ref().map(|methods| {
                                methods
                                    .iter()
                                    .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
                                    .collect()
                            }),
                            timeout: route.timeout.unwrap_or(defaults.timeout),
                            retries: route.retries.unwrap_or(defaults.retries),
                            max_body_bytes: route.max_body_bytes.unwrap_or(defaults.max_body_bytes),
                            transform: route.transform,
                            rate_limit: route
                                .rate_limit
                                .clone()
                                .unwrap_or_else(|| spec.policy.rate_limit.clone()),
                            balance: route
                                .balance
                                .clone()
                                .unwrap_or_else(|| spec.policy.balance.clone()),
                            policy: policy.clone(),
                            grpc: false,
                        };
                        (name.clone(), Arc::new(resolved))
                    })
                    .collect();
                (service.clone(), routes)
            })
            .collect();
        let mut grpc: Vec<(String, Arc<Route>)> = spec
            .0
            .iter()
            .filter(|(_, spec)| !spec.policy.grpc.is_empty())
            .flat_map(|(service, spec)| {
                let route = Arc::new(grpc_route(service, spec, defaults));
                spec.policy
                    .grpc
                    .iter()
                    .map(move |name| (name.clone(), route.clone()))
            })
            .collect();
        grpc.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        RouteTable { services, grpc }
    }

    /// Finds the service of a gRPC call by its path, `/{package.Service}/{Method}`: the
    /// service that lists the gRPC service, or else the longest package that contains it.
    pub fn resolve_grpc(&self, request_path: &str) -> Result<&Arc<Route>, String> {
        let cut = |text: &str| text.chars().take(100).collect::<String>();
        let Some((grpc_service, _method)) = request_path
            .strip_prefix('/')
            .and_then(|rest| rest.split_once('/'))
        else {
            return Err(format!(
                "`{}` is not a gRPC path (/package.Service/Method)",
                cut(request_path)
            ));
        };
        self.grpc
            .iter()
            .find(|(name, _)| {
                grpc_service
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
            .map(|(_, route)| route)
            .ok_or_else(|| {
                format!(
                    "no service in the route file serves gRPC `{}` (its `grpc:` list)",
                    cut(grpc_service)
                )
            })
    }

    /// Finds the route for a request path such as `/api/user/login`.
    pub fn resolve(&self, request_path: &str) -> Option<&Arc<Route>> {
        let rest = request_path.strip_prefix("/api/")?;
        let (service, route) = rest.split_once('/')?;
        self.services.get(service)?.get(route)
    }

    /// Why `request_path` resolves to no route, naming the service and route looked for (each
    /// cut to 100 characters, since a client wrote them).
    pub fn explain_miss(&self, request_path: &str) -> String {
        let cut = |text: &str| text.chars().take(100).collect::<String>();
        let parts = request_path
            .strip_prefix("/api/")
            .and_then(|rest| rest.split_once('/'));
        match parts {
            None => format!(
                "`{}` is not a routed path: routes are /api/{{service}}/{{route}}",
                cut(request_path)
            ),
            Some((service, _)) if !self.services.contains_key(service) => {
                format!("no service `{}` in the route file", cut(service))
            }
            Some((service, route)) => format!(
                "no route `{}` for service `{}` in the route file",
                cut(route),
                cut(service)
            ),
        }
    }

    /// The routes of `service`, by name; its gRPC route among them.
    pub fn routes_of(&self, service: &str) -> Vec<&Arc<Route>> {
        let mut routes: Vec<&Arc<Route>> = self
            .services
            .get(service)
            .map(|routes| routes.values().collect())
            .unwrap_or_default();
        routes.extend(self.grpc_route_of(service));
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes
    }

    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    fn grpc_route_of(&self, service: &str) -> Option<&Arc<Route>> {
        self.grpc
            .iter()
            .find(|(_, route)| &*route.service == service)
            .map(|(_, route)| route)
    }

    /// Every route, by service then name; each service's gRPC route once.
    pub fn all(&self) -> Vec<&Arc<Route>> {
        let mut routes: Vec<&Arc<Route>> =
            self.services.values().flat_map(HashMap::values).collect();
        for (_, route) in &self.grpc {
            if !routes.iter().any(|r| Arc::ptr_eq(r, route)) {
                routes.push(route);
            }
        }
        routes.sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name)));
        routes
    }

    pub fn route_count(&self) -> usize {
        self.services.values().map(HashMap::len).sum()
    }
}

/// A service's gRPC route: every call to the gRPC names it lists, with the gateway's
/// defaults and the service's settings.
fn grpc_route(service: &str, spec: &ServiceSpec, defaults: RouteDefaults) -> Route {
    Route {
        service: Arc::from(service),
        name: GRPC_ROUTE_NAME.to_string(),
        key: Arc::from(format!("{service}/{GRPC_ROUTE_NAME}")),
        path: String::new(),
        target: None,
        methods: Some(vec![http::Method::POST]),
        timeout: defaults.timeout,
        retries: defaults.retries,
        max_body_bytes: defaults.max_body_bytes,
        transform: Transform::None,
        policy: Arc::new(spec.policy.clone()),
        rate_limit: spec.policy.rate_limit.clone(),
        balance: spec.policy.balance.clone(),
        grpc: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServiceRoutes, ConfigError> {
        parse_routes(Path::new("services.yml"), text)
    }

    const DEFAULTS: RouteDefaults = RouteDefaults {
        max_body_bytes: 1 << 20,
        timeout: Duration::from_secs(5),
        retries: 2,
    };

    fn error_text(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn goms_short_form_parses() {
        let routes = parse("services:\n  user:\n    register: \"/register\"\n    login: \"/login\"\n  order:\n    submit: \"/order/submit\"\n").unwrap();
        assert_eq!(routes.0["user"].routes["login"].path, "/login");
        assert_eq!(routes.0["order"].routes["submit"].path, "/order/submit");
    }

    #[test]
    fn extended_form_parses() {
        let routes = parse(
            "services:\n  user:\n    login:\n      path: /login\n      methods: [get, POST]\n      timeout: 2s\n      retries: 1\n      transform: json\n",
        )
        .unwrap();
        let login = &routes.0["user"].routes["login"];
        assert_eq!(
            login.methods.as_deref(),
            Some(&["GET".to_string(), "POST".to_string()][..])
        );
        assert_eq!(login.timeout, Some(Duration::from_secs(2)));
        assert_eq!(login.retries, Some(1));
        assert_eq!(login.transform, Transform::Json);
    }

    #[test]
    fn bad_path_names_its_line() {
        for (path, reason) in [
            ("register", "must start with `/`"),
            ("/ring\\x07", "request target cannot carry"),
        ] {
            let error = error_text(&format!(
                "services:\n  user:\n    login: \"/login\"\n    other: \"{path}\"\n"
            ));
            assert!(error.starts_with("services.yml:4:"), "{error}");
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn grpc_calls_go_to_the_service_that_lists_them_or_the_longest_package() {
        let routes = parse(
            "services:\n  user:\n    login: /login\n    grpc: [goms.echo.v1.Echo]\n  \
             echo:\n    grpc: [goms.echo, goms.other.v2]\n",
        )
        .unwrap();
        let table = RouteTable::build(&routes, DEFAULTS);
        let service_of = |path: &str| {
            table
                .resolve_grpc(path)
                .map(|route| route.service.to_string())
        };
        assert_eq!(service_of("/goms.echo.v1.Echo/Unary").unwrap(), "user");
        assert_eq!(service_of("/goms.echo.v2.Echo/Unary").unwrap(), "echo");
        assert_eq!(service_of("/goms.other.v2.Thing/Do").unwrap(), "echo");
        for miss in ["/goms.echoes.v1.Echo/Unary", "/goms.Echo/Unary", "/nowhere"] {
            assert!(service_of(miss).is_err(), "{miss}");
        }
        let grpc = table.resolve_grpc("/goms.echo.v1.Echo/Unary").unwrap();
        assert!(grpc.grpc && grpc.key.as_ref() == "user/grpc");
        // A gRPC route is no HTTP route, and counts once among a service's routes.
        assert!(table.resolve("/api/user/grpc").is_none());
        assert_eq!(table.routes_of("echo").len(), 1);
        assert_eq!(table.all().len(), 3);
    }

    #[test]
    fn a_grpc_name_listed_twice_or_malformed_is_refused() {
        let error =
            error_text("services:\n  a:\n    grpc: [goms.echo]\n  b:\n    grpc: [goms.echo]\n");
        assert!(
            error.contains("`goms.echo` is served by both `a` and `b`"),
            "{error}"
        );
        for bad in ["[\"goms..echo\"]", "[\"/goms.Echo\"]", "[]", "goms.echo"] {
            let error = error_text(&format!(
                "services:\n  user:\n    login: /login\n    grpc: {bad}\n"
            ));
            assert!(error.starts_with("services.yml:4:"), "{bad}: {error}");
        }
    }

    #[test]
    fn duplicate_route_names_its_line() {
        let error = error_text("services:\n  user:\n    login: \"/a\"\n    login: \"/b\"\n");
        assert!(error.starts_with("services.yml:4:"), "{error}");
        assert!(error.contains("duplicate route `login`"), "{error}");
    }

    #[test]
    fn empty_service_is_refused() {
        let error = error_text("services:\n  user:\n  order:\n    submit: /submit\n");
        assert!(error.contains("service `user` has no routes"), "{error}");
        assert!(
            error.starts_with("services.yml:2:") || error.starts_with("services.yml:3:"),
            "{error}"
        );
    }

    #[test]
    fn unknown_extended_key_suggests() {
        let error =
            error_text("services:\n  user:\n    login:\n      path: /login\n      retrys: 1\n");
        assert!(error.starts_with("services.yml:5:"), "{error}");
        assert!(error.contains("did you mean `retries`"), "{error}");
    }

    #[test]
    fn bad_yaml_names_its_line() {
        let error = error_text("services:\n  user:\n    login: \"/login\n");
        assert!(error.starts_with("services.yml:"), "{error}");
    }

    #[test]
    fn service_settings_sit_beside_the_routes_and_default_what_they_leave_out() {
        let routes = parse(
            "services:\n  user:\n    login: /login\n    maxInFlight: 200\n    ejection:\n      baseTime: 10s\n    retryBudget: {percent: 50}\n  order:\n    submit: /submit\n    ejection: false\n",
        )
        .unwrap();
        let user = &routes.0["user"];
        assert_eq!(user.routes.keys().collect::<Vec<_>>(), ["login"]);
        assert_eq!(user.policy.max_in_flight, Some(200));
        let ejection = user.policy.ejection.unwrap();
        assert_eq!(ejection.base_time, Duration::from_secs(10));
        assert_eq!(ejection.consecutive_failures, 5);
        assert_eq!(user.policy.retry_budget.percent, 50);
        assert_eq!(user.policy.retry_budget.min_per_second, 10);
        assert_eq!(routes.0["order"].policy.ejection, None);
        assert_eq!(routes.0["order"].policy.max_in_flight, None);
    }

    #[test]
    fn a_route_takes_its_services_rate_limit_unless_it_sets_its_own_or_none() {
        let routes = parse(
            "services:\n  user:\n    login: /login\n    open:\n      path: /open\n      rateLimit: false\n    own:\n      path: /own\n      rateLimit: {requests: 1, per: 1m}\n    rateLimit: {requests: 10, key: \"header:X-Api-Key\"}\n",
        )
        .unwrap();
        let table = RouteTable::build(&routes, DEFAULTS);
        let limit = |route: &str| {
            table
                .resolve(&format!("/api/user/{route}"))
                .unwrap()
                .rate_limit
                .clone()
        };
        let login = limit("login").unwrap();
        assert_eq!(
            (login.requests, login.burst, login.per),
            (10, 10, Duration::from_secs(1))
        );
        assert_eq!(
            login.key,
            crate::config::RateLimitKey::Header("x-api-key".into())
        );
        assert_eq!(limit("open"), None);
        assert_eq!(limit("own").unwrap().per, Duration::from_secs(60));
        assert_eq!(limit("own").unwrap().key, crate::config::RateLimitKey::Ip);
    }

    #[test]
    fn a_route_balances_as_its_service_says_unless_it_sets_its_own_way() {
        let routes = parse(
            "services:\n  user:\n    login: /login\n    cart:\n      path: /cart\n      balance: {hash: \"cookie:session\"}\n    balance: least_request\n  order:\n    submit: /submit\n    balance: {hash: \"header:X-User\"}\n  stock:\n    get: /get\n    peek:\n      path: /peek\n      balance: {hash: ip}\n",
        )
        .unwrap();
        let table = RouteTable::build(&routes, DEFAULTS);
        let balance = |path: &str| table.resolve(path).unwrap().balance.clone();
        use crate::config::{Balance, HashOn};
        assert_eq!(balance("/api/user/login"), Balance::LeastRequest);
        assert_eq!(
            balance("/api/user/cart"),
            Balance::Hash(HashOn::Cookie("session".into()))
        );
        assert_eq!(
            balance("/api/order/submit"),
            Balance::Hash(HashOn::Header("x-user".into()))
        );
        assert_eq!(balance("/api/stock/get"), Balance::RoundRobin);
        assert_eq!(balance("/api/stock/peek"), Balance::Hash(HashOn::Ip));
    }

    #[test]
    fn invalid_service_settings_name_their_line() {
        let cases = [
            (
                "    maxInFlight: 0\n",
                "services.yml:4:",
                "`maxInFlight` must be a whole number from 1",
            ),
            ("    maxInFlight: -3\n", "services.yml:4:", "(got -3)"),
            (
                "    ejection:\n      consecutiveFailures: 0\n",
                "services.yml:5:",
                "`ejection.consecutiveFailures` must be",
            ),
            (
                "    ejection:\n      maxPercent: 0\n",
                "services.yml:",
                "between 1 and 100",
            ),
            (
                "    ejection:\n      baseTime: 1m\n      maxTime: 30s\n",
                "services.yml:",
                "shorter than `baseTime`",
            ),
            (
                "    ejection:\n      baseTme: 1s\n",
                "services.yml:5:",
                "did you mean `baseTime`",
            ),
            (
                "    retryBudget: {percent: 0}\n",
                "services.yml:",
                "between 1 and 1000",
            ),
            (
                "    retryBudget: {window: 2m}\n",
                "services.yml:",
                "between 1s and 60s",
            ),
            (
                "    maxInFlight: 1\n    maxInFlight: 2\n",
                "services.yml:5:",
                "duplicate setting",
            ),
            (
                "    rateLimit: {requests: 0}\n",
                "services.yml:4:",
                "`rateLimit.requests` must be",
            ),
            (
                "    rateLimit: {requests: 5, key: cookie}\n",
                "services.yml:4:",
                "must be `ip`, `route` or `header:NAME`",
            ),
            ("    rateLimit: true\n", "services.yml:4:", "says no limit"),
            (
                "    balance: fastest\n",
                "services.yml:4:",
                "must be `round_robin`, `least_request` or {hash: ...} (got `fastest`)",
            ),
            (
                "    balance: hash\n",
                "services.yml:4:",
                "needs what to hash",
            ),
            (
                "    balance: {hash: \"query:id\"}\n",
                "services.yml:4:",
                "`header:NAME`, `cookie:NAME` or `ip` (got `query:id`)",
            ),
            (
                "    balance: {hash: \"cookie:a b\"}\n",
                "services.yml:4:",
                "(got `cookie:a b`)",
            ),
            (
                "    other:\n      path: /other\n      balance: {hsh: ip}\n",
                "services.yml:6:",
                "unknown field `hsh`",
            ),
        ];
        for (setting, position, reason) in cases {
            let error = error_text(&format!("services:\n  user:\n    login: /login\n{setting}"));
            assert!(error.starts_with(position), "{setting:?}: {error}");
            assert!(error.contains(reason), "{setting:?}: {error}");
        }
    }

    #[test]
    fn table_resolves_service_and_route() {
        let routes = parse("services:\n  user:\n    login: /login\n").unwrap();
        let table = RouteTable::build(&routes, DEFAULTS);
        assert_eq!(table.resolve("/api/user/login").unwrap().path, "/login");
        assert!(table.resolve("/api/user/logout").is_none());
        assert!(table.resolve("/api/order/login").is_none());
        assert!(table.resolve("/user/login").is_none());
    }
}
