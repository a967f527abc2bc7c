//! Progress on stderr, the one helper behind every long-running command (`bench suite`,
//! `bench soak`, a single benchmark run): an `indicatif` bar redrawn in place when stderr is a
//! terminal, and nothing drawn when it is not (a pipe, a log file, a test). What a command
//! reports per finished step goes through [`Bar::line`]: above the bar on a terminal, a plain
//! line of its own otherwise, so logs and tests read one line per finished run either way.

use std::borrow::Cow;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

/// A progress display on stderr; cleared when dropped.
pub struct Bar {
    bar: ProgressBar,
}

/// The bar's characters: done, to do.
const CHARS: &str = "#.";

impl Bar {
    fn styled(len: Option<u64>, template: &str, target: ProgressDrawTarget) -> Bar {
        let style = ProgressStyle::with_template(template)
            .expect("the progress templates are valid")
            .progress_chars(CHARS);
        let bar = ProgressBar::with_draw_target(len, target)
            .with_style(style)
            .with_finish(ProgressFinish::AndClear);
        Bar { bar }
    }

    /// `len` steps: `[#####...............] 3/19 what is running now  ETA 1m10s` (the prefix
    /// and message are the caller's).
    pub fn steps(len: u64) -> Bar {
        Bar::styled(Some(len), "[{bar:20}] {prefix} {wide_msg}", ProgressDrawTarget::stderr())
    }

    /// A run of known length, counted in milliseconds: `soak [####......] 12.0 s  ...`.
    pub fn timed(what: &str, length: Duration) -> Bar {
        let template = format!("{what} [{{bar:30}}] {{wide_msg}}");
        Bar::styled(Some(length.as_millis() as u64), &template, ProgressDrawTarget::stderr())
    }

    /// A run of unknown length: a spinner, the time so far and the caller's message.
    pub fn spinner() -> Bar {
        let bar = Bar::styled(None, "{spinner} {elapsed:>4} {wide_msg}", ProgressDrawTarget::stderr());
        // The spinner turns on a ticker thread of its own; none where nothing is drawn.
        if !bar.is_hidden() {
            bar.bar.enable_steady_tick(Duration::from_millis(200));
        }
        bar
    }

    /// Nothing at all, not even [`Bar::line`]'s lines (`--json`).
    pub fn hidden() -> Bar {
        Bar { bar: ProgressBar::hidden() }
    }

    /// Whether nothing is drawn (stderr is not a terminal, or [`Bar::hidden`]).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Set the text after the bar.
    pub fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        self.bar.set_message(msg);
    }

    /// Set the text before the message (the suite's `3/19`).
    pub fn set_prefix(&self, prefix: impl Into<Cow<'static, str>>) {
        self.bar.set_prefix(prefix);
    }

    /// Move the bar to `pos`.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Print a finished step's line: above the bar on a terminal, else alone on stderr.
    pub fn line(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Print a closing line above the bar, on a terminal only, then clear the bar.
    pub fn finish(&self, line: &str) {
        if !self.bar.is_hidden() {
            self.bar.println(line);
        }
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_is_drawn_only_when_stderr_is_a_terminal() {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        for bar in [Bar::steps(3), Bar::timed("soak", Duration::from_secs(2)), Bar::spinner()] {
            assert_eq!(bar.is_hidden(), !tty);
        }
        assert!(Bar::hidden().is_hidden());
    }

    #[test]
    fn a_bar_on_a_terminal_shows_its_prefix_message_and_position() {
        let term = indicatif::InMemoryTerm::new(4, 80);
        let bar = Bar::styled(
            Some(4),
            "[{bar:20}] {prefix} {wide_msg}",
            ProgressDrawTarget::term_like(Box::new(term.clone())),
        );
        assert!(!bar.is_hidden());
        bar.set_prefix("2/4");
        bar.set_message("stream tcp rep 1");
        bar.set_position(1);
        bar.line("[1/4] stream tcp rep 1: 10 Gbit/s (2.0 s)");
        bar.bar.force_draw();
        let screen = term.contents();
        assert!(screen.starts_with("[1/4] stream tcp rep 1: 10 Gbit/s (2.0 s)\n"), "{screen}");
        assert!(screen.contains("[#####...............] 2/4 stream tcp rep 1"), "{screen}");
        bar.finish("done");
        assert!(term.contents().contains("done"), "{}", term.contents());
    }
}
