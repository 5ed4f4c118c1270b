//! A fleet's identities and their credentials: an auth directory holding `identities.json` (who
//! exists, in which role, with which public key, revoked or not), one nkey seed file per identity
//! under `creds/` (mode 0600), and `auth.conf`, the nats-server `accounts` block generated from
//! them, [`flotilla_protocol::roles`] and [`crate::accounts`]. `flotilla auth` and the test kit manage it; a
//! service or the CLI connects with one seed file (`--creds`, `FLOTILLA_CREDS`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use flotilla_protocol::roles::{self, Grants, Role};
use flotilla_protocol::{Names, Prefix};
use serde::{Deserialize, Serialize};

/// Errors of the auth directory.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a Flotilla identities file: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{0} already holds a Flotilla auth directory (identities.json); use `flotilla auth add-*`")]
    AlreadyInitialized(PathBuf),
    #[error("{0} holds no Flotilla auth directory; run `flotilla auth init` first")]
    NotInitialized(PathBuf),
    #[error("an identity named {0:?} exists already")]
    Exists(String),
    #[error("no identity named {0:?}")]
    Unknown(String),
    #[error("invalid name {0:?}: use 1-64 of A-Z a-z 0-9 _ -")]
    InvalidName(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path} holds no nkey user seed (a line starting with SU)")]
    NoSeed { path: PathBuf },
    #[error("the seed in {path} is not valid: {message}")]
    BadSeed { path: PathBuf, message: String },
}

/// What an identity may do: a fleet role, or the unrestricted admin (the break-glass credential
/// `flotilla auth init` writes for setting up and repairing a deployment; no service runs as it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RoleSpec {
    Dispatcher,
    BudgetKeeper,
    Monitor,
    Runner { id: String, templates: Vec<String> },
    Submitter { tenant: String },
    Operator { name: String },
    Auditor,
    Admin,
}

impl RoleSpec {
    /// The fleet role, or `None` for the admin.
    pub fn role(&self) -> Option<Role> {
        Some(match self {
            Self::Dispatcher => Role::Dispatcher,
            Self::BudgetKeeper => Role::BudgetKeeper,
            Self::Monitor => Role::Monitor,
            Self::Runner { id, templates } => Role::Runner { id: id.clone(), templates: templates.clone() },
            Self::Submitter { tenant } => Role::Submitter { tenant: tenant.clone() },
            Self::Operator { name } => Role::Operator { name: name.clone() },
            Self::Auditor => Role::Auditor,
            Self::Admin => return None,
        })
    }

    /// The kind, as written in tables.
    pub fn kind(&self) -> &'static str {
        self.role().map_or("admin", |r| r.kind())
    }
}

/// One identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Unique name; its seed is `creds/<name>.nk`.
    pub name: String,
    pub role: RoleSpec,
    /// The nkey user public key the server knows it by.
    pub public_key: String,
    pub created_ms: u64,
    /// When it was revoked; a revoked identity is left out of the server's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

impl Identity {
    /// Its private inbox prefix.
    pub fn inbox_prefix(&self) -> String {
        roles::inbox_prefix(&self.public_key)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdentitiesFile {
    /// The fleet's subject prefix the grants are written for.
    prefix: String,
    identities: Vec<Identity>,
    /// The accounts' resource limits.
    #[serde(default)]
    limits: crate::accounts::Limits,
}

/// An auth directory.
#[derive(Debug, Clone)]
pub struct AuthDir {
    dir: PathBuf,
    file: IdentitiesFile,
}

/// The identities every deployment has: one per service and the admin.
pub const SERVICE_IDENTITIES: [(&str, RoleSpec); 4] = [
    ("dispatcher", RoleSpec::Dispatcher),
    ("budget-keeper", RoleSpec::BudgetKeeper),
    ("monitor", RoleSpec::Monitor),
    ("admin", RoleSpec::Admin),
];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io { path: path.to_path_buf(), source }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Writes `contents` to `path` through a temporary file and a rename, mode 0600.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl AuthDir {
    /// Creates an auth directory for the fleet under `prefix`: the services' and the admin's
    /// identities, then writes the server configuration.
    pub fn init(dir: &Path, prefix: &Prefix) -> Result<Self, AuthError> {
        use std::os::unix::fs::DirBuilderExt as _;
        if dir.join("identities.json").exists() {
            return Err(AuthError::AlreadyInitialized(dir.to_path_buf()));
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir.join("creds")).map_err(io(dir))?;
        let mut auth = Self {
            dir: dir.to_path_buf(),
            file: IdentitiesFile {
                prefix: prefix.as_str().to_owned(),
                identities: Vec::new(),
                limits: crate::accounts::Limits::default(),
            },
        };
        for (name, role) in SERVICE_IDENTITIES {
            auth.create(name, role)?;
        }
        auth.save()?;
        Ok(auth)
    }

    /// Opens an existing auth directory.
    pub fn open(dir: &Path) -> Result<Self, AuthError> {
        let path = dir.join("identities.json");
        if !path.exists() {
            return Err(AuthError::NotInitialized(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let file = serde_json::from_str(&text).map_err(|source| AuthError::Parse { path, source })?;
        Ok(Self { dir: dir.to_path_buf(), file })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fleet's names the grants are written for.
    pub fn names(&self) -> Result<Names, AuthError> {
        Prefix::new(self.file.prefix.clone()).map(Names::new).map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Every identity, revoked ones included.
    pub fn identities(&self) -> &[Identity] {
        &self.file.identities
    }

    /// The identity named `name`, if it exists and is not revoked.
    pub fn get(&self, name: &str) -> Option<&Identity> {
        self.file.identities.iter().find(|i| i.name == name && i.revoked_ms.is_none())
    }

    /// The seed file of `name`.
    pub fn creds_path(&self, name: &str) -> PathBuf {
        self.dir.join("creds").join(format!("{name}.nk"))
    }

    /// The generated nats-server configuration (an `authorization` block to include).
    pub fn server_conf_path(&self) -> PathBuf {
        self.dir.join("auth.conf")
    }

    /// Adds an identity, writes its seed file and the server configuration, and returns the seed
    /// file's path. The server applies it on its next reload.
    pub fn add(&mut self, name: &str, role: RoleSpec) -> Result<PathBuf, AuthError> {
        self.create(name, role)?;
        self.save()?;
        Ok(self.creds_path(name))
    }

    /// Makes sure runner `id` has an identity (`runner-<id>`) for exactly `templates`: adds it,
    /// or changes the templates of the existing one (same key). Returns whether anything changed
    /// (the server then needs a reload).
    pub fn ensure_runner(&mut self, id: &str, templates: &[String]) -> Result<bool, AuthError> {
        let name = format!("runner-{id}");
        let wanted = RoleSpec::Runner { id: id.to_owned(), templates: templates.to_vec() };
        match self.file.identities.iter_mut().find(|i| i.name == name && i.revoked_ms.is_none()) {
            Some(i) if i.role == wanted => Ok(false),
            Some(i) => {
                i.role = wanted;
                self.save()?;
                Ok(true)
            }
            None => self.add(&name, wanted).map(|_| true),
        }
    }

    fn create(&mut self, name: &str, role: RoleSpec) -> Result<(), AuthError> {
        if !valid_name(name) {
            return Err(AuthError::InvalidName(name.to_owned()));
        }
        use flotilla_protocol::names::is_token;
        match &role {
            RoleSpec::Runner { id, templates } if !is_token(id) || !templates.iter().all(|t| is_token(t)) => {
                return Err(AuthError::Invalid(format!(
                    "runner id and templates must be subject tokens: {id:?} {templates:?}"
                )));
            }
            RoleSpec::Submitter { tenant: t } | RoleSpec::Operator { name: t } if !is_token(t) => {
                return Err(AuthError::Invalid(format!("{t:?} is not a subject token (A-Z a-z 0-9 _ -)")));
            }
            _ => {}
        }
        if self.file.identities.iter().any(|i| i.name == name && i.revoked_ms.is_none()) {
            return Err(AuthError::Exists(name.to_owned()));
        }
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| AuthError::Invalid(format!("nkey generation failed: {e}")))?;
        let path = self.creds_path(name);
        write_private(&path, format!("{seed}\n").as_bytes())?;
        self.file.identities.push(Identity {
            name: name.to_owned(),
            role,
            public_key: key.public_key(),
            created_ms: flotilla_protocol::time::now_ms(),
            revoked_ms: None,
        });
        Ok(())
    }

    /// Revokes `name`: it is left out of the server's configuration (its connections are closed
    /// on the server's next reload) and its seed file is removed.
    pub fn revoke(&mut self, name: &str) -> Result<(), AuthError> {
        let now = flotilla_protocol::time::now_ms();
        let identity = self
            .file
            .identities
            .iter_mut()
            .find(|i| i.name == name && i.revoked_ms.is_none())
            .ok_or_else(|| AuthError::Unknown(name.to_owned()))?;
        identity.revoked_ms = Some(now);
        let path = self.creds_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AuthError::Io { path, source: e }),
        }
        self.save()
    }

    /// Writes `identities.json` and `auth.conf`.
    fn save(&self) -> Result<(), AuthError> {
        let path = self.dir.join("identities.json");
        let text = serde_json::to_vec_pretty(&self.file)
            .map_err(|source| AuthError::Parse { path: path.clone(), source })?;
        write_private(&path, &text)?;
        let conf = self.render()?;
        write_private(&self.server_conf_path(), conf.as_bytes())
    }

    /// The nats-server `accounts` block of every identity not revoked.
    pub fn render(&self) -> Result<String, AuthError> {
        Ok(format!(
            "# Generated by `flotilla auth` from identities.json: regenerate, do not edit.\n\
             # Include it in the server's configuration (include \"auth.conf\") and reload the server\n\
             # (nats-server --signal reload) after every change.\n{}",
            crate::accounts::render_accounts(&[self.accounts_part()?])
        ))
    }

    /// The accounts' resource limits.
    pub fn limits(&self) -> &crate::accounts::Limits {
        &self.file.limits
    }

    /// Changes the accounts' resource limits and writes the server configuration (the server
    /// applies them on its next reload, to live connections too).
    pub fn set_limits(&mut self, limits: crate::accounts::Limits) -> Result<(), AuthError> {
        if let Some(t) = limits.tenants.keys().find(|t| !flotilla_protocol::names::is_token(t)) {
            return Err(AuthError::Invalid(format!("{t:?} is not a subject token (A-Z a-z 0-9 _ -)")));
        }
        self.file.limits = limits;
        self.save()
    }

    /// This fleet's part of the server's `accounts` block (several fleets' auth directories can
    /// share one server: [`crate::accounts::render_accounts`] of all their parts).
    pub fn accounts_part(&self) -> Result<crate::accounts::AccountsPart, AuthError> {
        use crate::accounts;
        let names = self.names()?;
        let mut part = accounts::AccountsPart {
            fleet_exports: accounts::fleet_exports(&names),
            fleet_limits: self.file.limits.fleet.clone(),
            ..Default::default()
        };
        for id in self.file.identities.iter().filter(|i| i.revoked_ms.is_none()) {
            let user = self.render_user(&names, id);
            match &id.role {
                RoleSpec::Submitter { tenant } => {
                    let entry =
                        part.tenants.entry(accounts::tenant_account(&names, tenant)).or_insert_with(|| {
                            (
                                self.file.limits.of_tenant(tenant),
                                String::new(),
                                accounts::tenant_imports(&names, tenant),
                            )
                        });
                    entry.1.push_str(&user);
                }
                _ => part.fleet_users.push_str(&user),
            }
        }
        Ok(part)
    }

    /// One entry of an account's `users` list.
    fn render_user(&self, names: &Names, id: &Identity) -> String {
        let mut out =
            format!("    # {} ({})\n    {{\n      nkey: {}\n", id.name, id.role.kind(), id.public_key);
        if let Some(role) = id.role.role() {
            let g = roles::grants(names, &role, &id.inbox_prefix());
            out.push_str(&render_permissions(&g));
        }
        out.push_str("    }\n");
        out
    }
}

impl AuthDir {
    /// Publishes every operator's signing key (and every revocation) into the fleet's
    /// `<p>_operators` bucket, which services check control requests against. Needs a connection
    /// that may write there: the admin's.
    pub async fn publish_operators(
        &self,
        fleet: &crate::Fleet,
        store: &async_nats::jetstream::kv::Store,
    ) -> Result<usize, crate::nats::FleetError> {
        let mut n = 0;
        for i in &self.file.identities {
            let RoleSpec::Operator { name } = &i.role else { continue };
            let key = flotilla_protocol::OperatorKey {
                name: name.clone(),
                public_key: i.public_key.clone(),
                revoked_ms: i.revoked_ms,
            };
            fleet.kv_put(store, &i.public_key, &key).await?;
            n += 1;
        }
        Ok(n)
    }
}

fn quoted(list: &[String]) -> String {
    let items: Vec<String> = list.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", items.join(", "))
}

fn render_permissions(g: &Grants) -> String {
    let mut p = String::from("      permissions: {\n");
    let section = |name: &str, allow: &[String], deny: &[String]| {
        let mut s = format!("        {name}: {{\n");
        if !allow.is_empty() {
            s.push_str(&format!("          allow: {}\n", quoted(allow)));
        }
        if !deny.is_empty() {
            s.push_str(&format!("          deny: {}\n", quoted(deny)));
        }
        s.push_str("        }\n");
        s
    };
    // Nothing at all allowed is written as a deny of everything (an empty allow means "all").
    let everything = vec![">".to_owned()];
    if g.publish.is_empty() {
        p.push_str(&section("publish", &[], &everything));
    } else {
        p.push_str(&section("publish", &g.publish, &g.publish_deny));
    }
    p.push_str(&section("subscribe", &g.subscribe, &g.subscribe_deny));
    if let Some(r) = g.responses {
        p.push_str(&format!(
            "        allow_responses: {{ max: {}, expires: \"{}s\" }}\n",
            r.max, r.expires_secs
        ));
    }
    p.push_str("      }\n");
    p
}

/// A seed file's seed and the public key and inbox prefix it implies.
#[derive(Clone)]
pub struct Credentials {
    seed: String,
    pub public_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("public_key", &self.public_key).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads a seed file (the first line starting with `SU`; other lines are ignored, so a
    /// decorated file works too).
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("SU"))
            .ok_or_else(|| AuthError::NoSeed { path: path.to_path_buf() })?
            .to_owned();
        let key = nkeys::KeyPair::from_seed(&seed)
            .map_err(|e| AuthError::BadSeed { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self { seed, public_key: key.public_key() })
    }

    /// The key pair of the seed.
    pub fn key_pair(&self) -> Result<nkeys::KeyPair, AuthError> {
        nkeys::KeyPair::from_seed(&self.seed).map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// The private inbox prefix of this identity.
    pub fn inbox_prefix(&self) -> String {
        roles::inbox_prefix(&self.public_key)
    }

    /// Connection options that authenticate with this seed and take replies on the identity's
    /// own inbox prefix.
    pub fn apply(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        options.nkey(self.seed.clone()).custom_inbox_prefix(self.inbox_prefix())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn init_add_revoke_and_render() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mut auth = AuthDir::init(dir.path(), &Prefix::default()).unwrap();
        assert!(matches!(
            AuthDir::init(dir.path(), &Prefix::default()),
            Err(AuthError::AlreadyInitialized(_))
        ));
        let path =
            auth.add("runner-r1", RoleSpec::Runner { id: "r1".into(), templates: vec!["w".into()] }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let creds = Credentials::load(&path).unwrap();
        assert_eq!(creds.public_key, auth.get("runner-r1").unwrap().public_key);
        let conf = std::fs::read_to_string(auth.server_conf_path()).unwrap();
        assert!(conf.contains(&creds.public_key));
        assert!(conf.contains("$JS.API.CONSUMER.CREATE.FLOTILLA_ASSIGNMENTS.runner-r1.flotilla.assign.r1"));
        assert!(
            !conf.contains("\"$JS.API.>\"") && !conf.contains("\"$JS.>\"") && !conf.contains("\"_INBOX.>\"")
        );
        assert!(matches!(auth.add("runner-r1", RoleSpec::Auditor), Err(AuthError::Exists(_))));
        auth.revoke("runner-r1").unwrap();
        assert!(!path.exists());
        let reopened = AuthDir::open(dir.path()).unwrap();
        assert!(reopened.get("runner-r1").is_none());
        assert!(!std::fs::read_to_string(auth.server_conf_path()).unwrap().contains(&creds.public_key));
    }
}
