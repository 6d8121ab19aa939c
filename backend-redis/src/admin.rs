//! Operator tools that work on a whole queue.

use std::time::Duration;

use ferrymq_core::{Error, ErrorKind, Result};
use redis::AsyncConnectionConfig;

use crate::client::map_error;
use crate::config::RedisConfig;

/// Escape glob metacharacters so a queue name matches itself in `SCAN … MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisConfig {
    /// Delete every key of this queue — ready, in-flight, delayed and dead-lettered
    /// messages, dedup claims — and return how many keys went. For tests and
    /// tooling; consumers still connected recreate their group on their next receive.
    pub async fn delete_queue(&self) -> Result<u64> {
        self.validate()?;
        let endpoint = self.endpoint();
        let client = redis::Client::open(self.client_url()?.as_str())
            .map_err(|e| Error::invalid_config("url", e.to_string()))?;
        let map = |e| map_error(e, "delete queue", &endpoint, &self.queue);
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout));
        let connect = client.get_multiplexed_async_connection_with_config(&conn_config);
        let mut conn = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r.map_err(map)?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "redis at {endpoint} could not be reached within {:?}",
                        self.connect_timeout
                    ),
                ))
            }
        };
        let pattern = format!("ferrymq:{{{}}}:*", glob_escape(&self.queue));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(map)?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(map)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "delete queue: SCAN did not finish within 60 s",
                ));
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_escape_escapes_metacharacters() {
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
