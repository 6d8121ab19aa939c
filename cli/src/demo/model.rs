//! The demo's business objects and its scripted misfortunes.

use serde::{Deserialize, Serialize};

/// What the order service enqueues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer: String,
    pub email: String,
    pub total_cents: u64,
    pub currency: String,
}

/// What the invoice worker produces for the email stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub invoice_id: String,
    pub order_id: String,
    pub email: String,
    pub total_cents: u64,
    pub currency: String,
}

const CUSTOMERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

/// The script: which order misbehaves how.
#[derive(Debug, Clone)]
pub struct Script {
    pub orders: Vec<Order>,
    /// Index of the order the client sends twice.
    pub duplicate: usize,
    /// Index of the poison order (an unsupported currency: fails every attempt).
    pub poison: usize,
}

impl Script {
    pub fn new(n: usize) -> Self {
        let poison = n * 2 / 3;
        let duplicate = 7 % n;
        let duplicate = if duplicate == poison {
            (duplicate + 1) % n
        } else {
            duplicate
        };
        let orders = (0..n)
            .map(|i| {
                let customer = CUSTOMERS[i % CUSTOMERS.len()];
                Order {
                    order_id: format!("ORD-{}", 1000 + i),
                    customer: customer.to_string(),
                    email: format!("{customer}@example.com"),
                    total_cents: 1_000 + (i as u64 * 7_919) % 90_000,
                    currency: if i == poison { "XXX" } else { "EUR" }.to_string(),
                }
            })
            .collect();
        Script {
            orders,
            duplicate,
            poison,
        }
    }
}

/// How many times the (simulated) payment gateway times out for an order before it
/// answers: every fourth order once, order #5 twice (it succeeds on its last attempt).
pub fn gateway_timeouts(order_id: &str) -> u32 {
    let n: u32 = order_id.trim_start_matches("ORD-").parse().unwrap_or(0);
    match n.saturating_sub(1000) {
        5 => 2,
        i if i % 4 == 2 => 1,
        _ => 0,
    }
}

pub fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}
