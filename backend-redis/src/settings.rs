//! A queue's settings, stored with the queue (`ferrymq:{Q}:meta`, a hash) by the
//! first client that uses it, and checked by every client after.
//!
//! Producers and consumers that disagree on a queue's settings fail in silence
//! otherwise: a producer with `priority_levels=8` writes priority 7 to a stream a
//! consumer with 4 levels never reads (and depth never counts); a consumer with a
//! shorter `visibility` reclaims the live leases of the others; a second consumer
//! `group` acks — and deletes — entries for every group. So the settings are facts
//! of the queue, and a client that disagrees is refused at connect with
//! `InvalidConfig` naming the setting.
//!
//! Why refuse a disagreeing `visibility` rather than adopt the recorded one: the
//! visibility a client was given is also the lease its handlers see (the
//! deadline on each delivery, what the worker plans with); quietly replacing it
//! would make the URL lie. To change a setting, stop every client of the queue and
//! call [`RedisAdmin::forget_settings`](crate::RedisAdmin::forget_settings); the
//! next client records its own.
//!
//! | field | recorded and checked by |
//! |---|---|
//! | `priority_levels` | every producer, consumer and `Admin::ensure` |
//! | `ordered` | every producer, consumer and `Admin::ensure` |
//! | `group`, `visibility_ms`, `max_deliveries`, `dlq_max_len`, `dlq_retention_ms`, `rate_limit` | consumers and `Admin::ensure` |
//!
//! An admin connection records nothing on connect: it adopts what the queue says,
//! so `describe` shows the queue as it is whatever URL it was opened with.
//!
//! **Older clients and `ordered`.** A consumer of a version before ordered queues
//! checks no `ordered` field: it would read an ordered queue with a plain
//! `XREADGROUP`, past the per-key gate. So an ordered queue records its visibility
//! as `<ms>;ordered` ([`ORDERED_MARK`]): such a consumer compares it with its own
//! `<ms>`, disagrees, and is refused (`visibility=…;ordered` in its error says
//! why), while this version compares the visibility without the mark. Older
//! producers check no visibility and stay welcome: what they write is what an
//! ordered queue reads. An ordered queue recorded before the mark (bare `<ms>`) is
//! marked by the next client of this version that agrees with it.

use ferrymq_core::{Error, Result};
use redis::Value;

use crate::client::ms;
use crate::config::RedisConfig;

/// Who connects: decides which settings are recorded and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Sends only: the priority levels decide where a message goes.
    Producer,
    /// Receives (a consumer, or `connect()`'s pair): every setting matters.
    Consumer,
    /// Administration: adopts the recorded settings, records on `ensure`.
    Admin,
    /// The dedup store: uses none of the queue's settings.
    Other,
}

/// Record the settings not yet recorded (when `write`) and return what is recorded.
/// Nothing is recorded when a recorded setting disagrees: the client is about to
/// be refused, and must not leave a setting of its own behind (a setting newer
/// than the queue's record, such as `ordered`, would then refuse every client
/// that agrees with the queue).
/// Values are compared without the `;ordered` mark; a recorded value that lacks
/// the mark ours has (an ordered queue recorded before the mark) is replaced by
/// ours.
/// KEYS: meta; ARGV: write 0/1, name, value, ... Returns HGETALL of meta.
pub(crate) const SETTINGS: &str = r#"
check_types({KEYS[1], 'hash'})
local function unmarked(v) return (string.gsub(v, ';ordered$', '')) end
if ARGV[1] == '1' then
  local agree = true
  for j = 2, #ARGV, 2 do
    local v = redis.call('HGET', KEYS[1], ARGV[j])
    if v and unmarked(v) ~= unmarked(ARGV[j + 1]) then agree = false end
  end
  if agree then
    for j = 2, #ARGV, 2 do
      local v = redis.call('HGET', KEYS[1], ARGV[j])
      if not v or (v ~= ARGV[j + 1] and unmarked(v) == v) then
        redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
      end
    end
  end
end
return redis.call('HGETALL', KEYS[1])
"#;

/// The mark an ordered queue's recorded visibility carries, so that consumers of
/// versions without ordered queues are refused (see the module docs).
pub(crate) const ORDERED_MARK: &str = ";ordered";

/// A recorded value without the [`ORDERED_MARK`].
fn unmarked(value: &str) -> &str {
    value.strip_suffix(ORDERED_MARK).unwrap_or(value)
}

/// The settings `role` records and checks, as (field, value, URL parameter).
pub(crate) fn settings_of(
    config: &RedisConfig,
    role: Role,
) -> Vec<(&'static str, String, &'static str)> {
    let mut out = Vec::new();
    if role == Role::Other {
        return out;
    }
    // First, so a client that disagrees on it hears about order, not about the
    // priority levels order implies.
    out.push((
        "ordered",
        if config.ordered { "1" } else { "0" }.to_string(),
        "ordered",
    ));
    out.push((
        "priority_levels",
        config.priority_levels.to_string(),
        "priority_levels",
    ));
    if matches!(role, Role::Consumer | Role::Admin) {
        out.push(("group", config.group.clone(), "group"));
        let mark = if config.ordered { ORDERED_MARK } else { "" };
        out.push((
            "visibility_ms",
            format!("{}{mark}", ms(config.visibility_timeout)),
            "visibility",
        ));
        out.push((
            "max_deliveries",
            config.max_deliveries.to_string(),
            "max_deliveries",
        ));
        out.push(("dlq_max_len", config.dlq_max_len.to_string(), "dlq_max_len"));
        out.push((
            "dlq_retention_ms",
            ms(config.dlq_retention).to_string(),
            "dlq_retention",
        ));
        out.push((
            "rate_limit",
            config.rate_limit.map_or_else(
                || "none".to_string(),
                |l| format!("{}/{}ms", l.jobs, ms(l.per)),
            ),
            "rate_limit",
        ));
    }
    out
}

/// The HGETALL reply as pairs.
pub(crate) fn recorded(reply: Value) -> Vec<(String, String)> {
    let items: Vec<String> = redis::from_redis_value(reply).unwrap_or_default();
    items
        .chunks_exact(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect()
}

fn shown(field: &str, value: &str) -> String {
    match field {
        "ordered" => (if value == "1" { "true" } else { "false" }).to_string(),
        "rate_limit" => value
            .strip_suffix("ms")
            .and_then(|v| v.split_once('/'))
            .and_then(|(n, p)| Some((n.parse::<u32>().ok()?, p.parse::<u64>().ok()?)))
            .map(|(n, p)| {
                crate::config::RateLimit::new(n, std::time::Duration::from_millis(p)).to_string()
            })
            .unwrap_or_else(|| value.to_string()),
        "visibility_ms" | "dlq_retention_ms" => unmarked(value)
            .parse::<u64>()
            .map(|ms| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string())
            .unwrap_or_else(|_| value.to_string()),
        _ => value.to_string(),
    }
}

/// `InvalidConfig` naming the first setting of `role` that disagrees with what the
/// queue recorded.
pub(crate) fn check(
    config: &RedisConfig,
    role: Role,
    recorded: &[(String, String)],
    meta_key: &str,
) -> Result<()> {
    for (field, ours, param) in settings_of(config, role) {
        let Some((_, theirs)) = recorded.iter().find(|(k, _)| k == field) else {
            continue;
        };
        if unmarked(theirs) != unmarked(&ours) {
            let why = if field == "group" {
                " — a queue has one consumer group: acked entries are deleted, so a second \
                 group would ack them for every group"
            } else {
                ""
            };
            return Err(Error::invalid_config(
                param,
                format!(
                    "queue {:?} is set up with {param}={} (recorded in {meta_key}); this client \
                     has {param}={}{why}. Use the same value, or stop every client of the queue \
                     and forget the recorded settings (RedisAdmin::forget_settings)",
                    config.queue,
                    shown(field, theirs),
                    shown(field, &ours),
                ),
            ));
        }
    }
    Ok(())
}

/// `config` with the recorded settings in place of its own (for an admin).
pub(crate) fn adopt(mut config: RedisConfig, recorded: &[(String, String)]) -> RedisConfig {
    for (field, value) in recorded {
        match field.as_str() {
            "priority_levels" => {
                if let Ok(v) = value.parse() {
                    config.priority_levels = v;
                }
            }
            "group" => config.group = value.clone(),
            "visibility_ms" => {
                if let Ok(v) = unmarked(value).parse() {
                    config.visibility_timeout = std::time::Duration::from_millis(v);
                }
            }
            "max_deliveries" => {
                if let Ok(v) = value.parse() {
                    config.max_deliveries = v;
                }
            }
            "dlq_max_len" => {
                if let Ok(v) = value.parse() {
                    config.dlq_max_len = v;
                }
            }
            "dlq_retention_ms" => {
                if let Ok(v) = value.parse() {
                    config.dlq_retention = std::time::Duration::from_millis(v);
                }
            }
            "ordered" => config.ordered = value == "1",
            "rate_limit" => {
                config.rate_limit = value
                    .strip_suffix("ms")
                    .and_then(|v| v.split_once('/'))
                    .and_then(|(n, p)| Some((n.parse().ok()?, p.parse().ok()?)))
                    .map(|(n, p)| {
                        crate::config::RateLimit::new(n, std::time::Duration::from_millis(p))
                    });
            }
            _ => {}
        }
    }
    // A recorded value this version cannot use (hand-edited) is ignored, not adopted.
    if config.validate().is_err() {
        tracing::warn!(queue = %config.queue, "ferrymq-redis: the recorded settings of the queue are not valid; ignored");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_core::ErrorKind;

    #[test]
    fn disagreements_name_the_setting() {
        let cfg = RedisConfig::new("q");
        let rec = vec![
            ("priority_levels".to_string(), "8".to_string()),
            ("visibility_ms".to_string(), "5000".to_string()),
        ];
        let e = check(&cfg, Role::Producer, &rec, "m").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("`priority_levels`"), "{e}");
        assert!(e.to_string().contains("priority_levels=8"), "{e}");
        let cfg = cfg.priority_levels(8);
        assert!(
            check(&cfg, Role::Producer, &rec, "m").is_ok(),
            "producers ignore visibility"
        );
        let e = check(&cfg, Role::Consumer, &rec, "m").unwrap_err();
        assert!(e.to_string().contains("`visibility`"), "{e}");
        assert!(e.to_string().contains("visibility=5s"), "{e}");
        assert!(check(&cfg, Role::Other, &rec, "m").is_ok());
        let adopted = adopt(RedisConfig::new("q"), &rec);
        assert_eq!(
            adopt(
                RedisConfig::new("q"),
                &[("visibility_ms".to_string(), "5000;ordered".to_string())]
            )
            .visibility_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(adopted.priority_levels, 8);
        assert_eq!(
            adopted.visibility_timeout,
            std::time::Duration::from_secs(5)
        );
    }
}
