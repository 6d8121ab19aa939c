//! The two workers of the pipeline, built from ferrymq's middleware.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq::jobs::TrackJobsLayer;
use ferrymq::middleware::{
    json_handler, Backoff, CatchPanicLayer, DedupLayer, ExtendVisibilityLayer, MemoryDedupStore,
    RetryToDlqLayer,
};
use ferrymq::{BoxError, Capabilities, Delivery, Message, Producer};
use tower::{Service, ServiceBuilder};

use super::model::{gateway_timeouts, Invoice, Order};

/// The reliability stack both stages share, outermost first: keep the lease while
/// working, skip duplicates, record job states, retry with backoff then dead-letter,
/// turn panics into errors, and give up on a handler after 10 s.
macro_rules! reliable {
    ($caps:expr, $dlq:expr, $jobs:expr, $handler:expr) => {
        ServiceBuilder::new()
            .layer(ExtendVisibilityLayer::from_capabilities($caps))
            // The demo re-sends an order with the same content: dedup by content.
            .layer(
                DedupLayer::new(MemoryDedupStore::new(Duration::from_secs(3600)))
                    .content_hash(true),
            )
            // Job states for the counts at the end (completed, dead-lettered).
            .layer($jobs)
            .layer(
                RetryToDlqLayer::from_arc($dlq)
                    .max_attempts(3)
                    .backoff(Backoff::new(Duration::from_millis(100)).max(Duration::from_secs(2))),
            )
            .layer(CatchPanicLayer::new())
            .timeout(Duration::from_secs(10))
            .service($handler)
    };
}

/// Invoice worker: turns an order into an invoice on the invoices queue.
pub fn invoice_service(
    caps: &Capabilities,
    dlq: Arc<dyn Producer>,
    jobs: TrackJobsLayer,
    invoices: Arc<dyn Producer>,
) -> impl Service<Delivery, Response = (), Error = BoxError, Future = impl Send + 'static> + Send + 'static
{
    // Per order id, how often the gateway has timed out so far.
    let timeouts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = json_handler(move |order: Order, _delivery: Delivery| {
        let (timeouts, invoices) = (timeouts.clone(), invoices.clone());
        async move {
            // Rendering the PDF takes a moment.
            tokio::time::sleep(Duration::from_millis(20 + order.total_cents % 60)).await;
            if order.currency == "XXX" {
                return Err::<(), BoxError>(
                    format!(
                        "currency {} is not supported by the invoicing service",
                        order.currency
                    )
                    .into(),
                );
            }
            {
                let mut seen = timeouts.lock().unwrap_or_else(|e| e.into_inner());
                let count = seen.entry(order.order_id.clone()).or_default();
                if *count < gateway_timeouts(&order.order_id) {
                    *count += 1;
                    return Err("payment gateway timed out".into());
                }
            }
            let invoice = Invoice {
                invoice_id: order.order_id.replace("ORD", "INV"),
                order_id: order.order_id.clone(),
                email: order.email.clone(),
                total_cents: order.total_cents,
                currency: order.currency.clone(),
            };
            invoices
                .send(Message::json(&invoice)?.key(order.customer))
                .await?;
            Ok(())
        }
    });
    reliable!(caps, dlq, jobs, handler)
}

/// Email worker: "sends" each invoice.
pub fn email_service(
    caps: &Capabilities,
    dlq: Arc<dyn Producer>,
    jobs: TrackJobsLayer,
) -> impl Service<Delivery, Response = (), Error = BoxError, Future = impl Send + 'static> + Send + 'static
{
    let handler = json_handler(|_invoice: Invoice, _delivery: Delivery| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<(), BoxError>(())
    });
    reliable!(caps, dlq, jobs, handler)
}
