//! Small shared helpers with no better home.

use std::future::Future;

use tokio_util::task::TaskTracker;

/// Runs hyper's internal tasks (HTTP/2 streams) on our tracker, so shutdown waits for them.
#[derive(Clone)]
pub struct TrackedExecutor(pub TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Writes `contents` to `path` atomically with mode 0600: a new temporary file with a
/// random name beside it (created exclusively, so a planted symlink is never followed),
/// synced, then renamed over `path`.
pub fn write_private_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    // tempfile creates the file O_EXCL with mode 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".hsd-write-")
        .tempfile_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The error and its causes, `: `-joined, each cause once (a transport error alone says
/// little; many errors repeat their source's text).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A small HTML page with a heading and one message, both escaped (parts come from
/// outside): what a person's browser gets from the login flows.
pub fn message_page(
    status: axum::http::StatusCode,
    title: &str,
    message: &str,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let html = format!(
        "<!doctype html><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
         <title>hsd: {t}</title><h1>{t}</h1><p>{m}</p>",
        t = html_escape(title),
        m = html_escape(message),
    );
    (status, axum::response::Html(html)).into_response()
}

/// `text` safe to place in HTML text or a quoted attribute.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_replace_a_planted_symlink_and_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let key = dir.path().join("noise.key");
        std::os::unix::fs::symlink(&victim, &key).unwrap();
        super::write_private_file(&key, b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let meta = std::fs::symlink_metadata(&key).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        // Nothing left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn html_escape_covers_text_and_attributes() {
        assert_eq!(
            super::html_escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }
}
