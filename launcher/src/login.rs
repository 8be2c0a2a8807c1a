//! The login a room's broker requires and its peers log in with: generated for the run, or taken
//! from the environment for someone else's broker; and the private file that hands a generated
//! password to outside clients (`launcher watch --password-file`).
//!
//! The children get the login through their environment, which only their user can read, never
//! through their command line, which every local user can read.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The user name and password a room's broker requires and its peers log in with.
#[derive(Clone)]
pub(crate) struct Login {
    /// The user name.
    pub user: String,
    password: String,
}

// By hand, so the password never reaches a log line.
impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Login {
    /// Characters of a generated password: 24 alphanumerics carry about 143 bits.
    pub const GENERATED_LEN: usize = 24;

    /// A login for `user` with a fresh random password (from the thread-local CSPRNG).
    pub fn generate(user: &str) -> Self {
        use rand::Rng;
        let password =
            rand::rng().sample_iter(rand::distr::Alphanumeric).take(Self::GENERATED_LEN).map(char::from).collect();
        Self { user: user.to_owned(), password }
    }

    /// The login in `HASHVOTE_USERNAME` and `HASHVOTE_PASSWORD` (an empty password if only the
    /// user name is set), for a room on someone else's broker; `None` without a user name.
    pub fn from_env() -> Option<Self> {
        let user = std::env::var("HASHVOTE_USERNAME").ok().filter(|u| !u.is_empty())?;
        Some(Self { user, password: std::env::var("HASHVOTE_PASSWORD").unwrap_or_default() })
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }
}

/// A password written for outside clients: `password` in a fresh directory under the system's
/// temporary directory, the directory mode 0700 and the file 0600 (both created new, so nothing
/// planted there beforehand is used). Both are removed when this is dropped.
#[derive(Debug)]
pub(crate) struct PasswordFile {
    dir: PathBuf,
    path: PathBuf,
}

impl PasswordFile {
    /// Writes `password` (and a newline) to a new private file.
    pub fn create(password: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let suffix: u64 = rand::random();
        let dir = std::env::temp_dir().join(format!("hashvote-{}-{suffix:016x}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let created = Self { path: dir.join("password"), dir };
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&created.path)?;
        writeln!(file, "{password}")?;
        Ok(created)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PasswordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
