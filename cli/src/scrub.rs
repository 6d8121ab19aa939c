//! Defence in depth for secrets: ferrymq's own messages never show a password, but
//! a usage error quotes the argument it rejects and a client library may log what it
//! was given. Everything `ferry` writes to standard error goes through here.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use ferrymq::redact::Secrets;
use tracing_subscriber::fmt::MakeWriter;

/// The secrets of this run, and a [`MakeWriter`] for standard error that scrubs
/// them out of every log line.
#[derive(Debug, Clone)]
pub struct Scrubbed(Arc<Secrets>);

impl Scrubbed {
    /// The secrets in the command line's arguments and in `FERRYMQ_URL`.
    pub fn from_command_line() -> Self {
        let mut secrets = Secrets::new();
        for arg in std::env::args_os() {
            secrets.add_text(&arg.to_string_lossy());
        }
        if let Some(url) = std::env::var_os("FERRYMQ_URL") {
            secrets.add_text(&url.to_string_lossy());
        }
        Scrubbed(Arc::new(secrets))
    }

    pub fn scrub(&self, text: &str) -> String {
        self.0.scrub(text)
    }

    /// Print a clap error (or help) scrubbed, and exit as clap would.
    pub fn clap_exit(&self, e: &clap::Error) -> ExitCode {
        let text = self.scrub(&e.render().to_string());
        if e.use_stderr() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    }
}

/// One log event, buffered and written scrubbed when the formatter is done with it.
#[derive(Debug)]
pub struct ScrubbingWriter {
    secrets: Arc<Secrets>,
    buf: Vec<u8>,
}

impl Write for ScrubbingWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let text = self.secrets.scrub(&String::from_utf8_lossy(&self.buf));
            self.buf.clear();
            std::io::stderr().write_all(text.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for ScrubbingWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

impl<'a> MakeWriter<'a> for Scrubbed {
    type Writer = ScrubbingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter {
            secrets: self.0.clone(),
            buf: Vec::new(),
        }
    }
}
