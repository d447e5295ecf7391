//! The process's two secrets: the key that signs and checks access tokens, and the key
//! of the request digests kept with `Idempotency-Key` records.
//!
//! Each comes from its variable (`ORDERFLOW_JWT_SECRET`), or from a file it names
//! (`ORDERFLOW_JWT_SECRET_FILE`, as container and Kubernetes secrets are mounted), or,
//! when neither is set, from a file in the data folder (`ORDERFLOW_DATA_DIR`) that the
//! first start generates with 32 random bytes and only its user may read. So a
//! deployment that forgets the secret still gets one nobody else knows, and tokens
//! survive a restart. There is no built-in default: a key in the source code signs
//! tokens anyone can forge.
//!
//! Every process that checks tokens must share the token secret, and every instance of
//! a service the digest secret (a retried request may reach another instance): on one
//! machine the data folder gives them the same files; across machines, set them.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Fewest bytes a secret may have: HS256 and HMAC-SHA256 keys shorter than the hash
/// (RFC 7518 §3.2) are refused.
pub const MIN_SECRET_BYTES: usize = 32;

/// The secret every orderflow before this one fell back to, published in its source:
/// refused wherever it is configured, so tokens forged with it never verify.
pub const RETIRED_DEVELOPMENT_SECRET: &str = "orderflow-development-secret-change-me";

/// One secret the process needs, and the names it goes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretKind {
    /// The variable holding the secret itself.
    pub variable: &'static str,
    /// The variable naming a file that holds it.
    pub file_variable: &'static str,
    /// The file in the data folder a generated one is kept in.
    pub stored_as: &'static str,
}

/// Signs and checks access tokens (HS256).
pub const TOKEN_SECRET: SecretKind = SecretKind {
    variable: "ORDERFLOW_JWT_SECRET",
    file_variable: "ORDERFLOW_JWT_SECRET_FILE",
    stored_as: "jwt-secret",
};

/// Keys the request digests of idempotency records (HMAC-SHA256).
pub const DIGEST_SECRET: SecretKind = SecretKind {
    variable: "ORDERFLOW_DIGEST_SECRET",
    file_variable: "ORDERFLOW_DIGEST_SECRET_FILE",
    stored_as: "digest-secret",
};

/// Where the configuration says a secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Given in its variable (already checked for length).
    Given(Secret),
    /// In a file its `_FILE` variable names.
    File(PathBuf),
    /// Kept in (or generated into) the data folder.
    Stored(PathBuf),
    /// Nowhere: neither variable is set and there is no data folder.
    Unavailable,
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Given(_) => f.write_str("Given(…)"),
            SecretSource::File(path) => write!(f, "File({})", path.display()),
            SecretSource::Stored(path) => write!(f, "Stored({})", path.display()),
            SecretSource::Unavailable => f.write_str("Unavailable"),
        }
    }
}

/// Secret bytes, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// A secret from text, refused (naming `origin`) when it is too short or the
    /// retired development secret.
    pub fn new(text: &str, origin: &str) -> anyhow::Result<Secret> {
        let text = text.trim_end_matches(['\n', '\r']);
        if text == RETIRED_DEVELOPMENT_SECRET {
            anyhow::bail!(
                "{origin} is the old development secret published in orderflow's source; \
                 use a random one (e.g. `openssl rand -hex 32`)"
            );
        }
        if text.len() < MIN_SECRET_BYTES {
            anyhow::bail!(
                "{origin} has {} bytes; a secret needs at least {MIN_SECRET_BYTES} \
                 (e.g. `openssl rand -hex 32`)",
                text.len()
            );
        }
        Ok(Secret(text.as_bytes().to_vec()))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl SecretSource {
    /// Reads the variables of `kind`: the secret itself, or a file, or (neither set)
    /// the data folder's file. Both set is refused, as is a secret given too short.
    pub fn from_lookup(
        kind: SecretKind,
        lookup: &impl Fn(&str) -> Option<String>,
        data_dir: Option<&Path>,
    ) -> anyhow::Result<SecretSource> {
        let value = lookup(kind.variable).filter(|value| !value.is_empty());
        let file = lookup(kind.file_variable).filter(|path| !path.trim().is_empty());
        match (value, file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "{} and {} are both set; set one",
                kind.variable,
                kind.file_variable
            ),
            (Some(value), None) => Ok(SecretSource::Given(Secret::new(&value, kind.variable)?)),
            (None, Some(path)) => Ok(SecretSource::File(PathBuf::from(path.trim()))),
            (None, None) => Ok(data_dir.map_or(SecretSource::Unavailable, |dir| {
                SecretSource::Stored(dir.join(kind.stored_as))
            })),
        }
    }

    /// The secret: given, read from its file, or read from (or first generated into)
    /// the data folder.
    pub fn resolve(&self, kind: SecretKind) -> anyhow::Result<Secret> {
        match self {
            SecretSource::Given(secret) => Ok(secret.clone()),
            SecretSource::File(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("{}: cannot read {}", kind.file_variable, path.display())
                })?;
                Secret::new(
                    &text,
                    &format!("{} ({})", kind.file_variable, path.display()),
                )
            }
            SecretSource::Stored(path) => stored(path),
            SecretSource::Unavailable => anyhow::bail!(
                "{} is not set and there is no data folder to keep a generated one in: \
                 set ORDERFLOW_DATA_DIR (or HOME), or {}",
                kind.variable,
                kind.variable
            ),
        }
    }
}

/// The secret kept at `path`, generated first when there is none. Several processes
/// starting at once agree on one: each writes its candidate to a file of its own and
/// links it into place, which succeeds for exactly one of them; the others read the
/// winner's, complete by then.
fn stored(path: &Path) -> anyhow::Result<Secret> {
    let origin = path.display().to_string();
    if let Some(text) = read_private(path)? {
        return Secret::new(&text, &origin);
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{origin} has no folder"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let candidate = path.with_extension(format!("{}.new", uuid::Uuid::now_v7().simple()));
    let text = random_hex(MIN_SECRET_BYTES);
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&candidate)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&candidate, path));
    let _ = std::fs::remove_file(&candidate);
    match linked {
        Ok(()) => {
            tracing::info!(path = %origin, "generated a new secret; it is kept there for later starts");
            Secret::new(&text, &origin)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = read_private(path)?
                .ok_or_else(|| anyhow::anyhow!("{origin} vanished while it was generated"))?;
            Secret::new(&text, &origin)
        }
        Err(error) => Err(error).with_context(|| format!("cannot write {origin}")),
    }
}

/// The text of a secret file, or `None` when there is none. A file other users may
/// read is refused: whoever reads it can forge tokens.
fn read_private(path: &Path) -> anyhow::Result<Option<String>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{} may be read by other users (mode {mode:o}): `chmod 600` it",
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .map(Some)
        .with_context(|| format!("cannot read {}", path.display()))
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buffer);
    buffer.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "orderflow-secrets-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn source(variables: &[(&str, &str)], data_dir: Option<&Path>) -> anyhow::Result<SecretSource> {
        let lookup = |name: &str| {
            variables
                .iter()
                .find(|(variable, _)| *variable == name)
                .map(|(_, value)| (*value).to_owned())
        };
        SecretSource::from_lookup(TOKEN_SECRET, &lookup, data_dir)
    }

    #[test]
    fn a_generated_secret_is_kept_private_and_used_again() {
        let dir = temporary_dir();
        let data = dir.join("data");
        let first = source(&[], Some(&data))
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap();
        assert_eq!(first.bytes().len(), 2 * MIN_SECRET_BYTES);
        let file = data.join("jwt-secret");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let folder = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(folder, 0o700);
        let again = source(&[], Some(&data))
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap();
        assert_eq!(first, again, "a restart uses the same secret");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = source(&[], Some(&data))
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap_err();
        assert!(error.to_string().contains("chmod 600"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn processes_starting_together_agree_on_one_secret() {
        let dir = temporary_dir();
        let path = dir.join("jwt-secret");
        let secrets: Vec<Secret> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8).map(|_| scope.spawn(|| stored(&path))).collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap().unwrap())
                .collect()
        });
        assert!(secrets.windows(2).all(|pair| pair[0] == pair[1]));
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no candidate file is left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn short_retired_and_doubly_given_secrets_are_refused() {
        let short = source(&[("ORDERFLOW_JWT_SECRET", "tooshort")], None).unwrap_err();
        assert_eq!(
            short.to_string(),
            "ORDERFLOW_JWT_SECRET has 8 bytes; a secret needs at least 32 (e.g. `openssl rand -hex 32`)"
        );
        let retired = source(
            &[("ORDERFLOW_JWT_SECRET", RETIRED_DEVELOPMENT_SECRET)],
            None,
        )
        .unwrap_err();
        assert!(retired.to_string().contains("old development secret"));
        let both = source(
            &[
                ("ORDERFLOW_JWT_SECRET", &"x".repeat(40)),
                ("ORDERFLOW_JWT_SECRET_FILE", "/run/secrets/jwt"),
            ],
            None,
        )
        .unwrap_err();
        assert!(both.to_string().contains("both set"));
        let nowhere = source(&[], None)
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap_err();
        assert!(nowhere.to_string().contains("ORDERFLOW_DATA_DIR"));
    }

    #[test]
    fn a_secret_file_is_read_and_checked() {
        let dir = temporary_dir();
        let file = dir.join("mounted");
        std::fs::write(&file, format!("{}\n", "k".repeat(32))).unwrap();
        let path = file.to_str().unwrap();
        let secret = source(&[("ORDERFLOW_JWT_SECRET_FILE", path)], None)
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap();
        assert_eq!(
            secret.bytes(),
            "k".repeat(32).as_bytes(),
            "the newline is not part of it"
        );
        std::fs::write(&file, "short").unwrap();
        let error = source(&[("ORDERFLOW_JWT_SECRET_FILE", path)], None)
            .unwrap()
            .resolve(TOKEN_SECRET)
            .unwrap_err();
        assert!(error.to_string().contains("has 5 bytes"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
