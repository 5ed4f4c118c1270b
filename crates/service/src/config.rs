//! Layered configuration: built-in defaults, then a TOML file, then `FLOTILLA_*` environment
//! variables (`__` separates sections), then command-line flags. Validated once after loading.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use flotilla_protocol::{Names, Prefix, WireFormat};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Settings every service shares (top level of the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonConfig {
    /// NATS server URL(s), comma-separated. `None` only matters to `flotilla up`, which then
    /// starts a local server.
    pub nats_url: Option<String>,
    /// Subject prefix; different prefixes are independent fleets on one NATS.
    pub prefix: String,
    /// Format of everything services publish.
    pub wire_format: WireFormat,
    /// Name of this instance in logs and health replies (defaults to a random id).
    pub instance: Option<String>,
    /// Stream and bucket settings.
    pub streams: StreamSettings,
    /// How to authenticate to NATS (`creds`, `tls_ca`, `tls_cert`, `tls_key`).
    #[serde(flatten)]
    pub auth: ClientAuth,
}

/// How a process authenticates to NATS: an nkey seed file (`flotilla auth` writes one per
/// identity) and, for TLS, the CA to trust and an optional client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientAuth {
    /// Seed file of this process's identity (`FLOTILLA_CREDS`).
    pub creds: Option<std::path::PathBuf>,
    /// CA certificate (PEM) the server's certificate must chain to; turns TLS on
    /// (`FLOTILLA_TLS_CA`).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers that verify clients (`FLOTILLA_TLS_CERT`).
    pub tls_cert: Option<std::path::PathBuf>,
    /// Key of the client certificate (PEM) (`FLOTILLA_TLS_KEY`).
    pub tls_key: Option<std::path::PathBuf>,
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            nats_url: None,
            prefix: flotilla_protocol::names::DEFAULT_PREFIX.to_owned(),
            wire_format: WireFormat::Msgpack,
            instance: None,
            streams: StreamSettings::default(),
            auth: ClientAuth::default(),
        }
    }
}

impl CommonConfig {
    /// Validates the prefix and returns the fleet's names.
    pub fn names(&self) -> anyhow::Result<Names> {
        Ok(Names::new(Prefix::new(self.prefix.clone())?))
    }

    /// The NATS URL if one was given (an empty value counts as none).
    pub fn nats_url(&self) -> Option<&str> {
        self.nats_url.as_deref().map(str::trim).filter(|u| !u.is_empty())
    }

    /// The NATS URL, or the local default.
    pub fn nats_url_or_default(&self) -> String {
        self.nats_url().unwrap_or("nats://127.0.0.1:4222").to_owned()
    }
}

/// Limits and replication of Flotilla's streams and buckets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Replicas of every stream and bucket (3 on a cluster).
    pub replicas: usize,
    /// `Nats-Msg-Id` de-duplication window of the submissions stream.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long submissions are kept for audit.
    #[serde(with = "humantime_serde")]
    pub submissions_max_age: Duration,
    /// How long events are kept (the audit trail).
    #[serde(with = "humantime_serde")]
    pub events_max_age: Duration,
    /// Byte cap on the events stream (oldest events go first); -1 for none. A cap reserves that
    /// much of the server's JetStream storage.
    pub events_max_bytes: i64,
    /// How long task records are kept after their last change.
    #[serde(with = "humantime_serde")]
    pub tasks_max_age: Duration,
    /// Largest message accepted on the submissions stream.
    pub max_msg_size: i32,
    /// How long direct messages are kept (a conversation can be read back this long; no message
    /// waits longer for its receiver than a day).
    #[serde(with = "humantime_serde")]
    pub messages_max_age: Duration,
    /// How long topic events are kept (what a subscriber that was away, or subscribes later
    /// from the start, can still get).
    #[serde(with = "humantime_serde")]
    pub topics_max_age: Duration,
    /// How long transcripts are kept at most (a tenant's may be shorter: the runners'
    /// `transcript_retention`, a per-message TTL).
    #[serde(with = "humantime_serde")]
    pub transcripts_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            submissions_max_age: Duration::from_secs(7 * 24 * 3600),
            events_max_age: Duration::from_secs(30 * 24 * 3600),
            events_max_bytes: -1,
            tasks_max_age: Duration::from_secs(30 * 24 * 3600),
            max_msg_size: 1024 * 1024,
            messages_max_age: Duration::from_secs(7 * 24 * 3600),
            topics_max_age: Duration::from_secs(7 * 24 * 3600),
            transcripts_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// The layered sources: defaults come from `T`'s `Default`; then the file, then the environment.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut f = Figment::new();
    if let Some(path) = file {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed("FLOTILLA_").split("__").ignore(&["config"]))
}

/// Extracts a config of type `T` from the figment, with `overrides` (usually command-line flags
/// that were given; serialize absent flags as nothing) merged last. `section` picks a table, e.g.
/// `dispatcher`; `None` reads the top level.
pub fn extract<T: DeserializeOwned + Serialize + Default>(
    figment: &Figment,
    section: Option<&str>,
    overrides: impl Serialize,
) -> anyhow::Result<T> {
    let base = Figment::from(Serialized::defaults(T::default()));
    let layered = match section {
        Some(s) => base.merge(figment.clone().focus(s)),
        None => base.merge(figment.clone()),
    };
    // Flags that were not given serialize as null and must not mask the file or environment.
    let mut overrides = serde_json::to_value(overrides)?;
    if let serde_json::Value::Object(map) = &mut overrides {
        map.retain(|_, v| !v.is_null());
    }
    let t = layered
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(t)
}

/// Generates a short random instance id.
pub fn random_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type
    fn file_then_env_then_overrides() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "f.toml",
                "prefix = \"fromfile\"\nwire_format = \"json\"\n[streams]\nreplicas = 3\n",
            )?;
            jail.set_env("FLOTILLA_PREFIX", "fromenv");
            let f = figment(Some(Path::new("f.toml")));
            let c: CommonConfig = extract(&f, None, serde_json::json!({})).unwrap();
            assert_eq!(c.prefix, "fromenv");
            assert_eq!(c.wire_format, WireFormat::Json);
            assert_eq!(c.streams.replicas, 3);
            let c: CommonConfig = extract(&f, None, serde_json::json!({"prefix": "fromflag"})).unwrap();
            assert_eq!(c.prefix, "fromflag");
            let c: CommonConfig = extract(&f, None, serde_json::json!({"prefix": null})).unwrap();
            assert_eq!(c.prefix, "fromenv");
            let c: CommonConfig = extract(&f, None, serde_json::json!({"prefix": "fromflag"})).unwrap();
            assert_eq!(c.prefix, "fromflag");
            Ok(())
        });
    }
}
