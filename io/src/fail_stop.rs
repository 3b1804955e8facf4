//! Fail-stop: a process of oc is either fully up or gone, never half alive.
//!
//! A panic on any thread (a data shard, the control executor, the shipper) ends the
//! whole process at once: one line on stderr naming the thread and the panic, then
//! `_exit` with [`EXIT_PANIC`]. No unwinding and no destructors run, because a
//! destructor that waits for the dead thread (a channel, a join, a log close) could
//! hang forever, which is what "half alive" looked like: a shard's thread gone, its
//! tenants' writes hanging, SIGTERM ignored. Nothing is lost by exiting: a write is
//! acknowledged only after its group's write is durable, and a restart's recovery rebuilds
//! the state from the log. The same exit is used for the other fatal conditions
//! (a failed log, a shutdown that overran its grace, an archive taken over by another
//! copy of the data directory, a data directory removed under it), each with its own
//! status so a supervisor's record
//! says which it was (OPERATIONS.md lists them).
//!
//! The line is written with one `write(2)` to descriptor 2, without taking the stderr
//! lock or calling the logging library, either of which the panicking thread may hold.

use std::panic::PanicHookInfo;

/// Exit status after a panic on any thread (Rust's own status for a panicking main).
pub const EXIT_PANIC: i32 = 101;
/// Exit status after a write or `fdatasync` of a write-ahead log failed.
pub const EXIT_LOG_FAILED: i32 = 3;
/// Exit status when an orderly shutdown overran its grace period.
pub const EXIT_SHUTDOWN_OVERRAN: i32 = 4;
/// Exit status when another process took the archive's owner record (`lease.json`):
/// another copy of this data directory ships to the same archive. Continuing would
/// let two writers mix two histories there.
pub const EXIT_ARCHIVE_TAKEN: i32 = 5;
/// Exit status when a follower's writer refused it as diverged (its log holds frames
/// off the writer's history): a restart takes the writer's epochs and cuts its log
/// where it left that history, which a running follower cannot do.
pub const EXIT_DIVERGED: i32 = 6;
/// Exit status when the data directory, or its lock file, was removed, moved or
/// replaced under the running process: the log's files may be unlinked, so writes
/// acknowledged from then on would be lost with them.
pub const EXIT_DATA_DIR_GONE: i32 = 7;

/// How the fatal line is written: like the text logs, or one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Text,
    Json,
}

/// Most bytes of a panic message put on the line.
const MAX_MESSAGE_BYTES: usize = 2048;

/// Installs the process's panic hook: any panic on any thread writes one line and
/// exits with [`EXIT_PANIC`]. Call once, first thing in `main`, in binaries only
/// (tests need panics to unwind).
pub fn install_panic_hook(program: &'static str, format: LineFormat) {
    std::panic::set_hook(Box::new(move |info| {
        if QUIET_ON_CLOSED_PIPE.load(std::sync::atomic::Ordering::Relaxed)
            && is_closed_pipe_print(&panic_message(info))
        {
            // SAFETY: ends the process at once, as `exit_now` does.
            unsafe { libc::_exit(EXIT_CLOSED_PIPE) }
        }
        let line = panic_line(program, format, info);
        exit_now(EXIT_PANIC, &line);
    }));
}

/// For command-line tools, with their panic hook installed: a reader that stops
/// early (`| head`) ends the process quietly with status 141 (as `SIGPIPE` ends other
/// tools), instead of a fatal line for its failed print. `SIGPIPE` itself stays
/// ignored: a socket the peer closed must be an error for the HTTP or S3 client, not
/// the end of the process.
pub fn end_quietly_on_closed_pipe() {
    QUIET_ON_CLOSED_PIPE.store(true, std::sync::atomic::Ordering::Relaxed);
}

static QUIET_ON_CLOSED_PIPE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Whether a panic message is one for a print (std's, or a library's write to
/// stdout) whose reader is gone.
pub fn is_closed_pipe_print(message: &str) -> bool {
    (message.starts_with("failed printing to std") || message.starts_with("failed to write"))
        && (message.contains("Broken pipe") || message.contains("BrokenPipe"))
}

/// The status of a process ended by `SIGPIPE` as shells report it (128 + 13).
pub const EXIT_CLOSED_PIPE: i32 = 141;

/// Writes `line` (a newline is added) to stderr with one `write(2)` and ends the
/// process with `status` without running destructors or exit handlers.
pub fn exit_now(status: i32, line: &str) -> ! {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    let mut written = 0;
    while written < bytes.len() {
        // SAFETY: write(2) from a live buffer to descriptor 2; the count is in bounds.
        let n = unsafe { libc::write(2, bytes[written..].as_ptr().cast(), bytes.len() - written) };
        if n <= 0 {
            break; // stderr is gone: exit all the same
        }
        written += n as usize;
    }
    // SAFETY: _exit(2) ends the process; nothing after it runs.
    unsafe { libc::_exit(status) }
}

/// The one line a panic produces.
/// The message a panic carries.
fn panic_message(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
        .to_string()
}

fn panic_line(program: &str, format: LineFormat, info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("unnamed");
    let message = panic_message(info);
    let message = truncate(&message, MAX_MESSAGE_BYTES);
    let location = info.location().map_or_else(
        || "unknown".to_string(),
        |l| format!("{}:{}", l.file(), l.line()),
    );
    fatal_line(
        program,
        format,
        &format!(
            "panic on thread '{thread}' at {location}: {message}; exiting with status \
             {EXIT_PANIC} so that a supervisor restarts the process and recovery runs"
        ),
    )
}

/// A fatal line in the format of the logs: `<program>: FATAL: <what>`, or a JSON
/// object with `level`, `target` and `fields.message`, as the JSON logs have.
pub fn fatal_line(program: &str, format: LineFormat, what: &str) -> String {
    match format {
        LineFormat::Text => format!("{program}: FATAL: {what}"),
        LineFormat::Json => {
            let mut out = String::with_capacity(what.len() + 96);
            out.push_str(r#"{"level":"FATAL","target":""#);
            json_escape_into(&mut out, program);
            out.push_str(r#"","fields":{"message":""#);
            json_escape_into(&mut out, what);
            out.push_str(r#""}}"#);
            out
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn json_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prints_to_a_closed_pipe_end_quietly() {
        assert!(is_closed_pipe_print(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(is_closed_pipe_print(
            "failed to write completion file: Os { code: 32, kind: BrokenPipe }"
        ));
        assert!(!is_closed_pipe_print("index out of bounds"));
        assert!(!is_closed_pipe_print("reading the archive: Broken pipe"));
    }

    #[test]
    fn fatal_lines_are_one_line_in_either_format() {
        let text = fatal_line("oc-server", LineFormat::Text, "it broke");
        assert_eq!(text, "oc-server: FATAL: it broke");
        let json = fatal_line("oc-server", LineFormat::Json, "a \"quote\"\nand\u{1} more");
        assert!(!json.contains('\n'), "{json}");
        assert_eq!(
            json,
            r#"{"level":"FATAL","target":"oc-server","fields":{"message":"a \"quote\"\nand\u0001 more"}}"#
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate(&long, MAX_MESSAGE_BYTES - 1);
        assert!(cut.len() < MAX_MESSAGE_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
