//! `goms check-config`: validates the files users edit, printing `file:line: reason`.

use std::path::{Path, PathBuf};

use crate::config::{
    load_routes_file, ConfigError, GomsConfig, DEFAULT_CONFIG_PATH, DEFAULT_ROUTES_PATH, ENV_PREFIX,
};

/// Checks goms.yml and/or services.yml; with neither path given, checks both defaults.
pub fn run(config: Option<&Path>, routes: Option<&Path>) -> anyhow::Result<()> {
    let config_named = config.is_some();
    let (config, routes): (Option<PathBuf>, Option<PathBuf>) = match (config, routes) {
        (None, None) => (
            Some(DEFAULT_CONFIG_PATH.into()),
            Some(DEFAULT_ROUTES_PATH.into()),
        ),
        (config, routes) => (config.map(Path::to_path_buf), routes.map(Path::to_path_buf)),
    };
    if let Some(path) = config {
        check_config(&path, config_named)?;
    }
    if let Some(path) = routes {
        let spec = load_routes_file(&path)?;
        let routes: usize = spec.0.values().map(|s| s.routes.len()).sum();
        let grpc: usize = spec.0.values().map(|s| s.policy.grpc.len()).sum();
        let grpc = match grpc {
            0 => String::new(),
            1 => ", 1 gRPC name".to_string(),
            n => format!(", {n} gRPC names"),
        };
        println!(
            "{}: ok ({} services, {routes} routes{grpc})",
            path.display(),
            spec.0.len()
        );
    }
    Ok(())
}

fn check_config(path: &Path, must_exist: bool) -> Result<(), ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !must_exist => None,
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    match &text {
        Some(text) => {
            let config = GomsConfig::check_file(path, text)?;
            validate(&config, path)?;
            println!("{}: ok", path.display());
        }
        None => println!("{}: absent, built-in defaults apply", path.display()),
    }
    check_environment(text.as_deref().unwrap_or(""))
}

/// Checks the `GOMS__*` overrides set in this environment on top of the file, as a node
/// started here would read them, so a mistyped variable is caught before a start.
fn check_environment(text: &str) -> Result<(), ConfigError> {
    let prefix = format!("{ENV_PREFIX}__");
    let mut overrides: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    if overrides.is_empty() {
        return Ok(());
    }
    overrides.sort();
    let config = GomsConfig::with_environment(text)?;
    config.validate().map_err(ConfigError::Environment)?;
    println!("environment: ok ({})", overrides.join(", "));
    Ok(())
}

fn validate(config: &GomsConfig, path: &Path) -> Result<(), ConfigError> {
    config.validate().map_err(|reason| ConfigError::Whole {
        path: path.to_path_buf(),
        reason,
    })
}
