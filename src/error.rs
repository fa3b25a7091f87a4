//! The crate's error type: every error names what went wrong and where (file, setting,
//! value), so a user can act on it.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    Candle(candle_core::Error),
    /// A file could not be read.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model file or directory is missing, truncated or does not match what is expected.
    Model { path: PathBuf, reason: String },
    /// A setting is out of range or inconsistent with the model.
    Setting {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// The caller cancelled the generation.
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn model(path: impl AsRef<Path>, reason: impl Into<String>) -> Self {
        Error::Model {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn setting(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::Setting {
            name,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Candle(e) => write!(f, "tensor error: {e}"),
            Error::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Error::Model { path, reason } => write!(f, "{}: {reason}", path.display()),
            Error::Setting {
                name,
                value,
                reason,
            } => {
                write!(f, "invalid value {value} for {name}: {reason}")
            }
            Error::Cancelled => write!(f, "generation cancelled"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Candle(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}
