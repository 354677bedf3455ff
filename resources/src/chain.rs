//! The one way errors are printed with their sources, for every crate of
//! the workspace (pvmm's stderr, pvmm-remote, the API's error bodies, log
//! lines, the test harnesses).

use std::error::Error;
use std::fmt;

/// An error and its sources, outermost first.
///
/// Displayed as `outer: inner: innermost`, or with `{:#}` one per line:
/// `outer`, then `  caused by: inner` for each source. A source whose
/// message the previous one already ends with (an error that prints its
/// source in its own message) is left out.
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl<'a> ErrorChain<'a> {
    /// The sources of the error, outermost first (not the error itself).
    pub fn causes(&self) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
        std::iter::successors(self.0.source(), |&e| e.source())
    }
}

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        for cause in self.causes() {
            let msg = cause.to_string();
            if last.ends_with(&msg) {
                continue;
            }
            if f.alternate() {
                write!(f, "\n  caused by: {msg}")?;
            } else {
                write!(f, ": {msg}")?;
            }
            last = msg;
        }
        Ok(())
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot add the device")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("Open failed: {0}")]
    struct Middle(#[source] std::io::Error);

    fn outer() -> Outer {
        Outer(Middle(std::io::Error::from(std::io::ErrorKind::NotFound)))
    }

    #[test]
    fn joins_sources_once() {
        let e = outer();
        assert_eq!(
            ErrorChain(&e).to_string(),
            "Cannot add the device: Open failed: entity not found"
        );
        assert_eq!(
            format!("{:#}", ErrorChain(&e)),
            "Cannot add the device\n  caused by: Open failed: entity not found"
        );
        let causes: Vec<String> = ErrorChain(&e).causes().map(|c| c.to_string()).collect();
        assert_eq!(
            causes,
            ["Open failed: entity not found", "entity not found"]
        );
        let leaf = std::io::Error::other("gone");
        assert_eq!(ErrorChain(&leaf).to_string(), "gone");
    }
}
