//! How `--help` shows each type of setting's default, and the bound every
//! setting of a type has ([`Value`], used by the `settings!` list).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{ByteSize, Cidr, DataPath, HumanDuration, KeyLayout, LogFormat, MAX_DURATION};
use crate::namespace::NamespaceConfig;

/// A type [`Config`] holds, for a setting read as `R`: how `--help` shows
/// its default, and the bound every setting of the type has.
pub(super) trait Value<R> {
    /// The default as it would be written on the command line.
    fn show(&self) -> String;
    /// Pushes a problem when the value is out of the type's bounds.
    fn bound(&self, _name: &str, _errs: &mut Vec<String>) {}
}

/// Types held as they are read, shown as they print.
macro_rules! shown_as_read {
    ($($t:ty),*) => {$(
        impl Value<$t> for $t {
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

shown_as_read!(usize, u32, u64, bool, String, LogFormat, KeyLayout, DataPath);

impl Value<HumanDuration> for Duration {
    fn show(&self) -> String {
        HumanDuration(*self).to_string()
    }

    fn bound(&self, name: &str, errs: &mut Vec<String>) {
        if *self > MAX_DURATION {
            errs.push(format!("{name}: must be at most 8760h (a year)"));
        }
    }
}

impl Value<ByteSize> for usize {
    fn show(&self) -> String {
        ByteSize(*self).to_string()
    }
}

impl Value<String> for SocketAddr {
    fn show(&self) -> String {
        self.to_string()
    }
}

impl Value<PathBuf> for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl Value<Vec<String>> for Vec<String> {
    fn show(&self) -> String {
        match self.is_empty() {
            true => "empty".into(),
            false => self.join(","),
        }
    }
}

impl Value<Vec<Cidr>> for Vec<Cidr> {
    fn show(&self) -> String {
        match self.is_empty() {
            true => "empty".into(),
            false => self
                .iter()
                .map(Cidr::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// File only (`#[arg(skip)]`), so never shown in `--help`.
impl Value<Vec<NamespaceConfig>> for Vec<NamespaceConfig> {
    fn show(&self) -> String {
        format!("{} tables", self.len())
    }
}

impl<R, T: Value<R>> Value<R> for Option<T> {
    fn show(&self) -> String {
        self.as_ref().map_or_else(|| "none".into(), T::show)
    }

    fn bound(&self, name: &str, errs: &mut Vec<String>) {
        if let Some(v) = self {
            v.bound(name, errs);
        }
    }
}
