//! The fleet file (TOML): agent templates a runner hosts, with their capabilities, model provider,
//! system prompt, concurrency and replicas.

use std::collections::BTreeMap;
use std::path::Path;

use std::time::Duration;

use anyhow::{Context as _, bail};
use flotilla_protocol::names::is_token;
use flotilla_protocol::validate::is_capability;
use serde::Deserialize;

use crate::llm::RetryPolicy;

/// A parsed fleet file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// Agent templates.
    #[serde(rename = "agent", default)]
    pub agents: Vec<AgentTemplate>,
}

/// One agent template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTemplate {
    /// Template name: 1–64 of `[A-Za-z0-9_-]`.
    pub name: String,
    /// Capabilities its agents serve.
    pub capabilities: Vec<String>,
    /// The tenant its agents belong to: their shared memory, and whom they may message without a
    /// grant (agents of the same tenant).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Topic patterns (`orders.created`, `orders.*`, `alerts.>`) whose events its agents act on:
    /// each event once per template (one of its agents takes it), whichever runner it is on.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Where the template's subscription starts when it is first made: `new` (default: what is
    /// published from then on), `all` (everything the topics stream still keeps) or an RFC 3339
    /// time. Later starts continue where the template left off.
    #[serde(default)]
    pub topics_from: Option<String>,
    /// The embedding model of `remember`/`recall` (OpenAI-compatible providers: asked at
    /// `<base_url>/embeddings`; default the chat `model`). The offline provider embeds offline.
    #[serde(default)]
    pub embedding_model: Option<String>,
    /// Where `remember`/`recall` embed (`<embedding_url>/embeddings`, OpenAI-compatible), for
    /// any provider, the offline one too: e.g. a local embedding model beside a remote chat
    /// model. Default: the provider's `base_url` (OpenAI-compatible providers), else offline.
    #[serde(default)]
    pub embedding_url: Option<String>,
    /// Model provider; `offline` is the built-in deterministic model.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Model name passed to the provider.
    #[serde(default)]
    pub model: String,
    /// System prompt.
    #[serde(default)]
    pub system_prompt: String,
    /// Tasks one agent runs at once.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Agents started from this template on each runner.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Autoscaling: the dispatcher may grow the template up to `max_replicas` on a runner when
    /// its capability's queue stays deep, and shrink it back to `min_replicas` when idle. Both
    /// default to `replicas` (no autoscaling).
    #[serde(default)]
    pub min_replicas: Option<u32>,
    #[serde(default)]
    pub max_replicas: Option<u32>,
    /// Labels tasks can require.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Tools its agents may call (built-in names such as `memory_get`, `delegate`).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Model calls per task before it fails with `max_steps_exceeded`.
    #[serde(default = "default_max_steps")]
    pub max_steps: u32,
    /// Default token cap of one task (a submission's `budget_tokens` overrides it).
    #[serde(default)]
    pub max_tokens_per_task: Option<u64>,
    /// Completion tokens one model call may produce.
    #[serde(default = "default_call_tokens")]
    pub max_tokens_per_call: u32,
    /// Fewest completion tokens worth making a call for: a budget with less left than the
    /// prompt plus this refuses the call (`budget_exceeded`) before it reaches the provider.
    #[serde(default = "default_min_call_tokens")]
    pub min_tokens_per_call: u32,
    /// Shared rate limits (budget-keeper keys, set with `flotilla budget rate`) every model call
    /// of this template needs a permit of. Defaults to `<provider>/<model>`, plus `key/<name>`
    /// when `api_key_env` names the API key.
    #[serde(default)]
    pub rate_limits: Option<Vec<String>>,
    /// Provider endpoint (OpenAI-compatible: `…/v1`; Anthropic: the host). Defaults to the
    /// provider's public API.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable (or secrets-file entry) holding the API key; defaults to
    /// `OPENAI_API_KEY` or `ANTHROPIC_API_KEY`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Limit on one HTTP request to the provider.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Retries of failed provider calls.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Record the transcript of this template's tasks (every model and tool call, see
    /// `flotilla replay`); off, replay says the task was not recorded.
    #[serde(default = "yes")]
    pub transcripts: bool,
    /// Stream the model's answers and publish their text as it arrives (`progress` events with
    /// `text_delta`). Only the `openai` provider streams; default `true` there, ignored elsewhere.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Least time between two partial-text events of one task: text arriving meanwhile is
    /// gathered into the next event; the rest goes out when the model call ends.
    #[serde(default = "default_stream_interval", with = "humantime_serde")]
    pub stream_interval: Duration,
    /// A streamed answer fails as stalled (`provider_timeout`) when nothing arrives for this long
    /// between two chunks; `request_timeout` still bounds the whole call.
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
}

impl AgentTemplate {
    /// (min_replicas, max_replicas), each defaulting to `replicas`.
    pub fn replica_limits(&self) -> (u32, u32) {
        (self.min_replicas.unwrap_or(self.replicas), self.max_replicas.unwrap_or(self.replicas))
    }

    /// True when this template's model calls stream.
    pub fn streams(&self) -> bool {
        self.provider == "openai" && self.stream.unwrap_or(true)
    }

    /// The shared rate limits this template's calls need permits of.
    pub fn rate_keys(&self) -> Vec<String> {
        if let Some(keys) = &self.rate_limits {
            return keys.clone();
        }
        let mut keys = vec![format!("{}/{}", self.provider, self.model)];
        if let Some(env) = &self.api_key_env {
            keys.push(format!("key/{env}"));
        }
        keys
    }
}

fn default_max_steps() -> u32 {
    8
}

fn default_call_tokens() -> u32 {
    1024
}

fn default_min_call_tokens() -> u32 {
    16
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_stream_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_provider() -> String {
    "offline".to_owned()
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl FleetFile {
    /// Parses and validates fleet TOML.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let fleet: FleetFile = toml::from_str(text).context("invalid fleet file")?;
        fleet.validate()?;
        Ok(fleet)
    }

    /// Reads and validates a fleet file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read fleet file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.agents.is_empty() {
            bail!("the fleet declares no agents (add an [[agent]] table)");
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.agents {
            if !is_token(&a.name) || a.name.len() > 64 {
                bail!("agent name {:?} must be 1-64 characters of A-Z a-z 0-9 _ -", a.name);
            }
            for t in &a.topics {
                let tokens: Vec<&str> = t.split('.').collect();
                let last = tokens.len().saturating_sub(1);
                let ok = tokens
                    .iter()
                    .enumerate()
                    .all(|(i, tok)| is_token(tok) || *tok == "*" || (*tok == ">" && i == last));
                if !ok {
                    bail!("agent {:?}: topic {t:?} must be dot-separated words, * or a final >", a.name);
                }
            }
            if let Some(from) = &a.topics_from
                && from != "new"
                && from != "all"
                && flotilla_protocol::validate::parse_time_ms(&flotilla_protocol::TimeSpec::Text(
                    from.clone(),
                ))
                .is_err()
            {
                bail!("agent {:?}: topics_from {from:?} must be new, all or an RFC 3339 time", a.name);
            }
            if !seen.insert(&a.name) {
                bail!("agent name {:?} is declared twice", a.name);
            }
            if a.capabilities.is_empty() {
                bail!("agent {:?} declares no capabilities", a.name);
            }
            if let Some(c) = a.capabilities.iter().find(|c| !is_capability(c)) {
                bail!("agent {:?}: capability {c:?} must be 1-128 characters of A-Z a-z 0-9 _ - .", a.name);
            }
            if a.concurrency == 0 || a.concurrency > 10_000 {
                bail!("agent {:?}: concurrency must be 1-10000", a.name);
            }
            if a.replicas > 10_000 {
                bail!("agent {:?}: replicas must be at most 10000", a.name);
            }
            let (min, max) = a.replica_limits();
            if min > a.replicas || a.replicas > max || max > 10_000 {
                bail!(
                    "agent {:?}: need min_replicas ({min}) <= replicas ({}) <= max_replicas ({max}) <= 10000",
                    a.name,
                    a.replicas
                );
            }
            if !["offline", "openai", "anthropic"].contains(&a.provider.as_str()) {
                bail!(
                    "agent {:?}: unknown provider {:?} (use offline, openai or anthropic)",
                    a.name,
                    a.provider
                );
            }
            if a.max_steps == 0 || a.max_tokens_per_call == 0 {
                bail!("agent {:?}: max_steps and max_tokens_per_call must be positive", a.name);
            }
            if a.stream_idle_timeout.is_zero() {
                bail!("agent {:?}: stream_idle_timeout must be positive", a.name);
            }
            if a.stream_interval > Duration::from_secs(60) {
                bail!("agent {:?}: stream_interval must be at most 60s", a.name);
            }
        }
        Ok(())
    }
}

fn default_tenant() -> String {
    flotilla_protocol::DEFAULT_TENANT.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_demo_fleet() {
        let f = FleetFile::parse(include_str!("../../../examples/demo-fleet.toml")).unwrap();
        assert_eq!(f.agents.len(), 2);
        assert_eq!(f.agents[0].replicas, 2);
    }

    #[test]
    fn rejects_bad_fleets() {
        assert!(FleetFile::parse("").is_err());
        assert!(FleetFile::parse("[[agent]]\nname='a b'\ncapabilities=['x']").is_err());
        assert!(FleetFile::parse("[[agent]]\nname='a'\ncapabilities=[]").is_err());
        assert!(FleetFile::parse("[[agent]]\nname='a'\ncapabilities=['x']\ncolour='red'").is_err());
        assert!(FleetFile::parse("[[agent]]\nname='a'\ncapabilities=['x']\nprovider='mystery'").is_err());
        let f = FleetFile::parse(
            "[[agent]]\nname='a'\ncapabilities=['x']\nprovider='openai'\ntools=['memory_get']\nrequest_timeout='90s'\n[agent.retry]\nmax_attempts=2",
        )
        .unwrap();
        assert_eq!(f.agents[0].request_timeout, Duration::from_secs(90));
        assert_eq!(f.agents[0].retry.max_attempts, 2);
        assert!(f.agents[0].streams(), "openai streams by default");
        assert_eq!(f.agents[0].stream_interval, Duration::from_millis(250));
    }

    #[test]
    fn streaming_settings() {
        let f = FleetFile::parse(
            "[[agent]]\nname='a'\ncapabilities=['x']\nprovider='openai'\nstream=false\n\n\
             [[agent]]\nname='b'\ncapabilities=['x']\nprovider='anthropic'\nstream=true\n\n\
             [[agent]]\nname='c'\ncapabilities=['x']\nprovider='openai'\nstream_interval='1s'\nstream_idle_timeout='5s'",
        )
        .unwrap();
        assert!(!f.agents[0].streams());
        assert!(!f.agents[1].streams(), "only openai streams");
        assert!(f.agents[2].streams());
        assert_eq!(f.agents[2].stream_interval, Duration::from_secs(1));
        assert_eq!(f.agents[2].stream_idle_timeout, Duration::from_secs(5));
        assert!(
            FleetFile::parse("[[agent]]\nname='a'\ncapabilities=['x']\nstream_idle_timeout='0s'").is_err()
        );
    }
}
