//! The services' log writer: `tracing` lines go to stderr in batches instead of one `write`
//! per line. An `INFO` (or more verbose) line is appended to a buffer (one lock, one copy); a
//! writer thread wakes when the buffer stops being empty, waits [`FLUSH_INTERVAL`] for more
//! lines, and writes them all with one `write_all`. Under load that is one system call for
//! many lines (the token service logs one line per issued token); an idle service writes each
//! line within [`FLUSH_INTERVAL`]. A `WARN` or `ERROR` line (the audit records, failures) is
//! written before the call that logs it returns, with whatever was buffered before it.
//!
//! No line is lost at shutdown or on a panic: [`flush_logs`] writes what is buffered (the
//! services call it before their own `eprintln!` lines and before exiting, through
//! [`crate::exit_code`]), and the panic hook installed by [`crate::init_logging`] flushes
//! before the panic message. Only a process killed outright (SIGKILL) can lose the lines of
//! its last [`FLUSH_INTERVAL`]. A writer that cannot keep up never makes the buffer grow past
//! [`MAX_BUFFERED`]: the line that reaches it writes the buffer itself (back-pressure).
//! Lines keep their order: the buffer is taken and written under one output lock.

use std::io::{self, Write};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// The longest a line waits in the buffer while the writer thread runs.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(5);
/// Buffered bytes at which a line's writer writes the buffer itself.
pub const MAX_BUFFERED: usize = 256 * 1024;

/// A line buffer in front of an output (stderr in the services, anything in tests).
pub struct Batched {
    buffer: Mutex<Vec<u8>>,
    not_empty: Condvar,
    /// The output; also the lock under which a taken buffer is written, so batches keep
    /// their order.
    out: Mutex<Box<dyn Write + Send>>,
}

impl Batched {
    pub fn new(out: Box<dyn Write + Send>) -> Batched {
        Batched { buffer: Mutex::new(Vec::with_capacity(64 * 1024)), not_empty: Condvar::new(), out: Mutex::new(out) }
    }

    /// Appends `data` (one formatted line); wakes the writer thread when the buffer was empty.
    pub fn append(&self, data: &[u8]) -> io::Result<()> {
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        let was_empty = buffer.is_empty();
        buffer.extend_from_slice(data);
        let full = buffer.len() >= MAX_BUFFERED;
        drop(buffer);
        if full {
            return self.flush();
        }
        if was_empty {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// Writes everything buffered now.
    pub fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = {
            let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
            if buffer.is_empty() {
                return Ok(());
            }
            // Keep a buffer of the same size for the next batch.
            let capacity = buffer.capacity();
            std::mem::replace(&mut *buffer, Vec::with_capacity(capacity))
        };
        out.write_all(&taken)?;
        out.flush()
    }

    /// The writer thread's loop: waits for a first line, lets more arrive for
    /// [`FLUSH_INTERVAL`], writes them; never returns.
    pub fn run(&self) -> ! {
        loop {
            {
                let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
                while buffer.is_empty() {
                    buffer = self.not_empty.wait(buffer).unwrap_or_else(PoisonError::into_inner);
                }
            }
            std::thread::sleep(FLUSH_INTERVAL);
            // Nowhere to report a failing stderr; the next batch tries again.
            let _ = self.flush();
        }
    }
}

static STDERR: OnceLock<Batched> = OnceLock::new();

/// The batched stderr, with its writer thread started; `None` when the thread cannot be
/// started (then lines are written directly, one `write` each).
pub fn batched_stderr() -> Option<&'static Batched> {
    if let Some(b) = STDERR.get() {
        return Some(b);
    }
    let batched = STDERR.get_or_init(|| Batched::new(Box::new(io::stderr())));
    std::thread::Builder::new().name("log-writer".into()).spawn(|| batched.run()).ok().map(|_| batched)
}

/// Writes the lines buffered for stderr now (before a process's own `eprintln!` lines, and
/// before it exits). Does nothing when logging was not initialised.
pub fn flush_logs() {
    if let Some(b) = STDERR.get() {
        let _ = b.flush();
    }
}

/// What `tracing-subscriber` writes each line to: the batched stderr; `WARN` and `ERROR`
/// lines at once.
pub struct LogWriters(pub &'static Batched);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriters {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        // Level unknown: written at once.
        LogWriter { batched: self.0, at_once: true }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        // `Level` orders the more verbose levels greater: WARN and ERROR are `<= WARN`.
        LogWriter { batched: self.0, at_once: *meta.level() <= tracing::Level::WARN }
    }
}

/// One line's writer (see [`LogWriters`]).
pub struct LogWriter {
    batched: &'static Batched,
    at_once: bool,
}

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.batched.append(data)?;
        if self.at_once {
            self.batched.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // An INFO line is complete when appended; the writer thread writes it.
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn lines_stay_buffered_until_flushed_and_keep_their_order() {
        let sink = Sink::default();
        let b = Batched::new(Box::new(sink.clone()));
        b.append(b"one\n").unwrap();
        b.append(b"two\n").unwrap();
        assert_eq!(sink.text(), "", "no writer thread: nothing written before a flush");
        b.flush().unwrap();
        assert_eq!(sink.text(), "one\ntwo\n");
        b.flush().unwrap();
        assert_eq!(sink.text(), "one\ntwo\n", "an empty buffer writes nothing");
    }

    #[test]
    fn the_writer_thread_writes_lines_soon() {
        let sink = Sink::default();
        let b: &'static Batched = Box::leak(Box::new(Batched::new(Box::new(sink.clone()))));
        std::thread::spawn(|| b.run());
        for i in 0..100 {
            b.append(format!("line {i}\n").as_bytes()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sink.text().ends_with("line 99\n") {
            assert!(Instant::now() < deadline, "not written: {:?}", sink.text());
            std::thread::sleep(Duration::from_millis(1));
        }
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), expected);
    }

    #[test]
    fn warnings_are_written_at_once_after_the_lines_before_them() {
        use tracing_subscriber::fmt::MakeWriter as _;
        let sink = Sink::default();
        let b: &'static Batched = Box::leak(Box::new(Batched::new(Box::new(sink.clone()))));
        let writers = LogWriters(b);
        let meta = |level| {
            struct Cs;
            impl tracing::callsite::Callsite for Cs {
                fn set_interest(&self, _: tracing::subscriber::Interest) {}
                fn metadata(&self) -> &tracing::Metadata<'_> {
                    unreachable!()
                }
            }
            static CS: Cs = Cs;
            tracing::Metadata::new(
                "test",
                "test",
                level,
                None,
                None,
                None,
                tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CS)),
                tracing::metadata::Kind::EVENT,
            )
        };
        writers.make_writer_for(&meta(tracing::Level::INFO)).write_all(b"info\n").unwrap();
        assert_eq!(sink.text(), "", "an INFO line waits for the writer thread");
        writers.make_writer_for(&meta(tracing::Level::WARN)).write_all(b"warn\n").unwrap();
        assert_eq!(sink.text(), "info\nwarn\n");
        writers.make_writer_for(&meta(tracing::Level::ERROR)).write_all(b"error\n").unwrap();
        writers.make_writer().write_all(b"unknown\n").unwrap();
        assert_eq!(sink.text(), "info\nwarn\nerror\nunknown\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_line_that_fills_it() {
        let sink = Sink::default();
        let b = Batched::new(Box::new(sink.clone()));
        let line = vec![b'x'; 1023];
        let lines = MAX_BUFFERED / 1024 + 1;
        for _ in 0..lines {
            b.append(&line).unwrap();
            b.append(b"\n").unwrap();
        }
        assert!(sink.text().len() >= MAX_BUFFERED, "written without a flush or a writer thread");
        b.flush().unwrap();
        assert_eq!(sink.text().len(), lines * 1024);
    }
}
