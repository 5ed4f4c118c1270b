//! The NATS accounts of a deployment and their resource limits: one `FLEET` account for the
//! services, runners, operators and auditors (it holds every stream and bucket), and one account
//! per tenant for that tenant's submitters, which imports from `FLEET` exactly what a submitter
//! needs (its submit subject, its events live, its tasks' events and its memory by subject) and
//! has its own limits on connections, subscriptions and payload, and no JetStream of its own, so
//! one tenant cannot exhaust the server for the others.

use std::collections::BTreeMap;

use flotilla_protocol::Names;
use serde::{Deserialize, Serialize};

/// The account every identity but the tenants' submitters is in.
pub const FLEET_ACCOUNT: &str = "FLEET";

/// The account of `tenant`'s submitters in the fleet under `names`' prefix.
pub fn tenant_account(names: &Names, tenant: &str) -> String {
    format!("TENANT_{}_{tenant}", names.prefix())
}

/// Limits of one account (`None`: the server's own, unlimited unless its configuration says
/// otherwise). JetStream limits apply to the `FLEET` account only: tenant accounts store nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLimits {
    /// Concurrent client connections of the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Concurrent subscriptions of the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u64>,
    /// Largest message a client of the account may publish, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload: Option<u64>,
    /// JetStream memory storage, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mem: Option<u64>,
    /// JetStream file storage, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file: Option<u64>,
    /// JetStream streams (the fleet has 17, its buckets included, and a budget-keeper snapshot store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<u64>,
    /// JetStream consumers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_consumers: Option<u64>,
}

impl AccountLimits {
    /// A tenant's limits unless set otherwise: 64 connections, 1,024 subscriptions, 1 MiB
    /// payloads.
    pub fn tenant_default() -> Self {
        Self {
            max_connections: Some(64),
            max_subscriptions: Some(1024),
            max_payload: Some(1024 * 1024),
            ..Self::default()
        }
    }

    /// These limits with every limit `other` sets taken from it.
    pub fn merged(&self, other: &Self) -> Self {
        Self {
            max_connections: other.max_connections.or(self.max_connections),
            max_subscriptions: other.max_subscriptions.or(self.max_subscriptions),
            max_payload: other.max_payload.or(self.max_payload),
            max_mem: other.max_mem.or(self.max_mem),
            max_file: other.max_file.or(self.max_file),
            max_streams: other.max_streams.or(self.max_streams),
            max_consumers: other.max_consumers.or(self.max_consumers),
        }
    }

    fn render_limits(&self) -> String {
        let fields: Vec<String> = [
            ("max_connections", self.max_connections),
            ("max_subscriptions", self.max_subscriptions),
            ("max_payload", self.max_payload),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
        .collect();
        if fields.is_empty() { String::new() } else { format!("    limits: {{ {} }}\n", fields.join(", ")) }
    }

    fn render_jetstream(&self) -> String {
        let fields: Vec<String> = [
            ("max_mem", self.max_mem),
            ("max_file", self.max_file),
            ("max_streams", self.max_streams),
            ("max_consumers", self.max_consumers),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
        .collect();
        if fields.is_empty() {
            "    jetstream: enabled\n".to_owned()
        } else {
            format!("    jetstream: {{ {} }}\n", fields.join(", "))
        }
    }
}

/// The limits of a deployment's accounts, kept in `identities.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The `FLEET` account's.
    #[serde(default)]
    pub fleet: AccountLimits,
    /// Every tenant's, unless `tenants` says otherwise.
    #[serde(default = "AccountLimits::tenant_default")]
    pub tenant: AccountLimits,
    /// Per tenant: what differs from `tenant`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, AccountLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fleet: AccountLimits::default(),
            tenant: AccountLimits::tenant_default(),
            tenants: BTreeMap::new(),
        }
    }
}

impl Limits {
    /// The limits `tenant`'s account runs with.
    pub fn of_tenant(&self, tenant: &str) -> AccountLimits {
        self.tenants.get(tenant).map_or_else(|| self.tenant.clone(), |t| self.tenant.merged(t))
    }
}

/// What `FLEET` offers the tenant accounts of the fleet under `names`' prefix. No consumer API:
/// a consumer's creator chooses its `deliver_subject`, which NATS does not check, so a tenant able
/// to create one in `FLEET` could have the server publish into the fleet's own subjects.
pub fn fleet_exports(names: &Names) -> Vec<String> {
    let (events, memory) = (names.events_stream(), names.memory_bucket());
    vec![
        format!("{{ service: \"{}\" }}", names.tenant_submit_all()),
        format!("{{ stream: \"{}\" }}", names.task_events_all()),
        format!("{{ service: \"$JS.API.DIRECT.GET.{events}.{}\" }}", names.task_events_all()),
        format!("{{ service: \"$JS.API.DIRECT.GET.KV_{memory}.$KV.{memory}.>\" }}"),
    ]
}

/// What `tenant`'s account imports from `FLEET`: only its own part of each export.
pub fn tenant_imports(names: &Names, tenant: &str) -> Vec<String> {
    let (events, memory) = (names.events_stream(), names.memory_bucket());
    let own_events = names.tenant_task_events(tenant);
    let service = |s: String| format!("{{ service: {{ account: {FLEET_ACCOUNT}, subject: \"{s}\" }} }}");
    // The server answers `$JS.API` itself in an account without JetStream ("not enabled"), so
    // the JetStream API is imported under the tenant API prefix.
    let api = |s: String| {
        format!(
            "{{ service: {{ account: {FLEET_ACCOUNT}, subject: \"$JS.API.{s}\" }}, to: \"{}.{s}\" }}",
            names.tenant_js_api()
        )
    };
    vec![
        service(names.tenant_submit_subject(tenant)),
        format!("{{ stream: {{ account: {FLEET_ACCOUNT}, subject: \"{own_events}\" }} }}"),
        api(format!("DIRECT.GET.{events}.{own_events}")),
        api(format!("DIRECT.GET.KV_{memory}.$KV.{memory}.{tenant}.>")),
    ]
}

/// One fleet's part of the server's `accounts` block: its `FLEET` users and exports, and its
/// tenants' accounts.
#[derive(Debug, Clone, Default)]
pub struct AccountsPart {
    pub fleet_users: String,
    pub fleet_exports: Vec<String>,
    pub fleet_limits: AccountLimits,
    /// Account name → (limits, users, imports).
    pub tenants: BTreeMap<String, (AccountLimits, String, Vec<String>)>,
}

/// The server's `accounts` block of one or more fleets sharing the server (their `FLEET` users
/// in one account; the `FLEET` limits are the first fleet's).
pub fn render_accounts(parts: &[AccountsPart]) -> String {
    let mut out = String::from("accounts {\n");
    let fleet_limits = parts.first().map(|p| p.fleet_limits.clone()).unwrap_or_default();
    out.push_str(&format!("  {FLEET_ACCOUNT}: {{\n"));
    out.push_str(&fleet_limits.render_jetstream());
    out.push_str(&fleet_limits.render_limits());
    out.push_str("    users: [\n");
    for p in parts {
        out.push_str(&p.fleet_users);
    }
    out.push_str("    ]\n    exports: [\n");
    for e in parts.iter().flat_map(|p| &p.fleet_exports) {
        out.push_str(&format!("      {e}\n"));
    }
    out.push_str("    ]\n  }\n");
    for (name, (limits, users, imports)) in parts.iter().flat_map(|p| &p.tenants) {
        out.push_str(&format!("  {name}: {{\n"));
        out.push_str(&limits.render_limits());
        out.push_str("    users: [\n");
        out.push_str(users);
        out.push_str("    ]\n    imports: [\n");
        for i in imports {
            out.push_str(&format!("      {i}\n"));
        }
        out.push_str("    ]\n  }\n");
    }
    out.push_str("}\n");
    out
}
