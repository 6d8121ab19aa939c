//! How `ferry` prints messages and queue descriptions, as text and as JSON.

use std::time::{Duration, SystemTime};

use ferrymq::admin::QueueInfo;
use ferrymq::{reserved, Accuracy, Attempts, Capabilities, Message, Ordering, Priority};
use serde_json::{json, Value};

/// One message to show: from a peek (no lease) or from a delivery.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a> {
    pub id: &'a str,
    pub enqueued_at: Option<SystemTime>,
    pub message: &'a Message,
}

impl<'a> From<&'a ferrymq::admin::Peeked> for Shown<'a> {
    fn from(p: &'a ferrymq::admin::Peeked) -> Self {
        Shown {
            id: &p.id,
            enqueued_at: p.enqueued_at,
            message: &p.message,
        }
    }
}

impl<'a> From<&'a ferrymq::Delivery> for Shown<'a> {
    fn from(d: &'a ferrymq::Delivery) -> Self {
        Shown {
            id: d.id(),
            enqueued_at: Some(d.meta().enqueued_at),
            message: d.message(),
        }
    }
}

fn time(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| humantime::format_rfc3339_millis(t).to_string(),
    )
}

/// The reserved dead-letter headers, labelled, in the order they are printed.
const DEAD_LETTER_HEADERS: [(&str, &str); 6] = [
    ("reason", reserved::FAILURE_REASON),
    ("origin queue", reserved::ORIGIN_QUEUE),
    ("attempts", reserved::ATTEMPTS),
    ("first failure", reserved::FIRST_FAILURE_AT),
    ("dead-lettered", reserved::DEAD_LETTERED_AT),
    ("origin id", reserved::ORIGIN_MESSAGE_ID),
];

/// A message as text. `dead_letter`: lead with the reserved dead-letter headers
/// (reason, origin queue, attempts ...), `-` where absent.
pub fn print_message(n: usize, m: Shown<'_>, dead_letter: bool) {
    println!(
        "--- #{n}  id {}  key {}  enqueued {}",
        m.id,
        m.message.get_key().unwrap_or("-"),
        time(m.enqueued_at)
    );
    let headers = m.message.headers();
    if dead_letter {
        for (label, name) in DEAD_LETTER_HEADERS {
            println!("{label:<15} {}", headers.get(name).unwrap_or("-"));
        }
    }
    for (name, value) in headers.iter() {
        if !dead_letter || !reserved::ALL.contains(&name) {
            println!("header          {name}: {value}");
        }
    }
    if let Some(p) = m.message.get_priority() {
        println!("priority        {p}");
    }
    println!(
        "payload         {}",
        String::from_utf8_lossy(m.message.payload())
    );
}

/// A message as one JSON object.
pub fn message_json(m: Shown<'_>, dead_letter: bool) -> Value {
    let h = m.message.headers();
    let headers: serde_json::Map<String, Value> = h
        .iter()
        .filter(|(n, _)| !dead_letter || !reserved::ALL.contains(n))
        .map(|(n, v)| (n.to_string(), Value::from(v)))
        .collect();
    let mut v = json!({
        "id": m.id,
        "key": m.message.get_key(),
        "priority": m.message.get_priority(),
        "enqueued_at": m.enqueued_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        "headers": headers,
        "payload": String::from_utf8_lossy(m.message.payload()),
    });
    if dead_letter {
        let extra = json!({
            "reason": h.get(reserved::FAILURE_REASON),
            "origin_queue": h.get(reserved::ORIGIN_QUEUE),
            "attempts": h.get(reserved::ATTEMPTS).and_then(|a| a.parse::<u64>().ok()),
            "first_failure_at": h.get(reserved::FIRST_FAILURE_AT),
            "dead_lettered_at": h.get(reserved::DEAD_LETTERED_AT),
            "origin_message_id": h.get(reserved::ORIGIN_MESSAGE_ID),
        });
        if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
            v.extend(extra);
        }
    }
    v
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn opt_dur(d: Option<Duration>, none: &str) -> String {
    d.map_or_else(|| none.to_string(), dur)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub fn ordering(o: Ordering) -> String {
    match o {
        Ordering::None => "none".into(),
        Ordering::PerKey => "per key (one in flight per key)".into(),
        Ordering::PerKeyPipelined => "per key, pipelined (several in flight per key)".into(),
        other => format!("{other:?}"),
    }
}

pub fn priority(p: Priority) -> String {
    match p {
        Priority::None => "ignored".into(),
        Priority::Exact => "exact".into(),
        Priority::Levels(n) => format!("{n} levels"),
        other => format!("{other:?}"),
    }
}

pub fn attempts(a: Attempts) -> String {
    match a {
        Attempts::Untracked => "untracked".into(),
        Attempts::Exact => "exact".into(),
        Attempts::Approximate => "approximate".into(),
        Attempts::NacksOnly => "nacks only".into(),
        other => format!("{other:?}"),
    }
}

pub fn accuracy(a: Accuracy) -> String {
    match a {
        Accuracy::Unavailable => "unavailable".into(),
        Accuracy::Exact => "exact".into(),
        Accuracy::Approximate => "approximate".into(),
        other => format!("{other:?}"),
    }
}

/// Every capability, labelled and formatted, in display order.
pub fn capability_rows(c: &Capabilities) -> Vec<(&'static str, String)> {
    vec![
        ("ordering", ordering(c.ordering)),
        ("priority", priority(c.priority)),
        (
            "visibility timeout",
            opt_dur(c.visibility_timeout, "none (no leases)"),
        ),
        ("extend visibility", yes_no(c.extend_visibility).into()),
        ("max visibility", opt_dur(c.max_visibility, "unbounded")),
        ("max delay", opt_dur(c.max_delay, "no delayed messages")),
        (
            "max nack delay",
            opt_dur(c.max_nack_delay, "none (a nack redelivers at once)"),
        ),
        ("nack delay blocks", yes_no(c.nack_delay_blocks).into()),
        (
            "release keeps attempt",
            yes_no(c.release_keeps_attempt).into(),
        ),
        ("attempts", attempts(c.attempts)),
        (
            "dedup window",
            opt_dur(c.dedup_window, "none (use the Dedup middleware)"),
        ),
        ("depth", accuracy(c.depth)),
        ("bounded", yes_no(c.bounded).into()),
        ("max message size", format!("{} bytes", c.max_message_size)),
        ("max batch", c.max_batch.to_string()),
        (
            "native dead letter",
            c.native_dead_letter_after
                .map_or_else(|| "never".into(), |n| format!("after {n} deliveries")),
        ),
    ]
}

/// `ferry queue describe` as text.
pub fn print_info(info: &QueueInfo, identity: &str) {
    let d = &info.depth;
    println!("queue           {}", info.name);
    println!("backend         {}", info.capabilities.backend);
    println!("identity        {identity}");
    println!(
        "depth           waiting {}  in flight {}  delayed {}  dead-lettered {}  ({})",
        d.waiting,
        d.in_flight,
        d.delayed,
        d.dead_lettered,
        accuracy(info.capabilities.depth)
    );
    println!("capabilities");
    for (label, value) in capability_rows(&info.capabilities) {
        println!("  {label:<22} {value}");
    }
    if !info.settings.is_empty() {
        println!("settings");
        for (name, value) in &info.settings {
            println!("  {name:<22} {value}");
        }
    }
    if !info.warnings.is_empty() {
        println!("warnings");
        for w in &info.warnings {
            println!("  ! {w}");
        }
    }
}

/// `ferry queue describe --json`.
pub fn info_json(info: &QueueInfo, identity: &str) -> Value {
    let c = &info.capabilities;
    let d = |d: Option<Duration>| d.map(dur);
    json!({
        "queue": info.name,
        "backend": c.backend,
        "identity": identity,
        "depth": {
            "waiting": info.depth.waiting,
            "in_flight": info.depth.in_flight,
            "delayed": info.depth.delayed,
            "dead_lettered": info.depth.dead_lettered,
            "accuracy": accuracy(c.depth),
        },
        "capabilities": {
            "ordering": ordering(c.ordering),
            "priority": priority(c.priority),
            "visibility_timeout": d(c.visibility_timeout),
            "extend_visibility": c.extend_visibility,
            "max_visibility": d(c.max_visibility),
            "max_delay": d(c.max_delay),
            "max_nack_delay": d(c.max_nack_delay),
            "nack_delay_blocks": c.nack_delay_blocks,
            "release_keeps_attempt": c.release_keeps_attempt,
            "attempts": attempts(c.attempts),
            "dedup_window": d(c.dedup_window),
            "depth": accuracy(c.depth),
            "bounded": c.bounded,
            "max_message_size": c.max_message_size,
            "max_batch": c.max_batch,
            "native_dead_letter_after": c.native_dead_letter_after,
        },
        "settings": info.settings.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "warnings": info.warnings,
    })
}
