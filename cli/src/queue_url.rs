//! Derive one URL per queue from a backend URL.

use ferrymq::{Error, Result};
use url::Url;

/// The URL of `queue` on the backend of `template`.
///
/// A template containing `{queue}` gets it replaced. Otherwise the queue name in the URL
/// is swapped: the host for `memory://NAME` (and any URL without a path, like
/// `sqs://NAME?...`), else the last path segment (`redis://host:port/NAME`).
pub fn for_queue(template: &str, queue: &str) -> Result<String> {
    if template.contains("{queue}") {
        return Ok(template.replace("{queue}", queue));
    }
    let mut url = Url::parse(template)
        .map_err(|e| Error::invalid_config("url", format!("{template:?} is not a URL: {e}")))?;
    let path = url.path().trim_matches('/').to_string();
    if url.scheme() == "memory" || path.is_empty() {
        url.set_host(Some(queue)).map_err(|e| {
            Error::invalid_config("url", format!("cannot name queue {queue:?}: {e}"))
        })?;
    } else {
        let mut segments: Vec<&str> = path.split('/').collect();
        if let Some(last) = segments.last_mut() {
            *last = queue;
        }
        url.set_path(&format!("/{}", segments.join("/")));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_queue_name() {
        assert_eq!(
            for_queue("memory://{queue}?visibility=2s", "a").unwrap(),
            "memory://a?visibility=2s"
        );
        assert_eq!(
            for_queue("memory://orders?visibility=2s", "a").unwrap(),
            "memory://a?visibility=2s"
        );
        assert_eq!(
            for_queue("redis://127.0.0.1:6379/orders?group=g", "a").unwrap(),
            "redis://127.0.0.1:6379/a?group=g"
        );
        assert_eq!(
            for_queue("kafka://127.0.0.1:9092/orders", "b").unwrap(),
            "kafka://127.0.0.1:9092/b"
        );
        assert_eq!(
            for_queue("sqs://orders?region=us-east-1", "c").unwrap(),
            "sqs://c?region=us-east-1"
        );
        assert!(for_queue("not a url", "a").is_err());
    }
}
