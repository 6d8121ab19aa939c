//! The SDK client, queue resolution (and creation), and what a queue can do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use ferrymq_core::{Accuracy, Attempts, Capabilities, Depth, Error, ErrorKind, Ordering, Result};

use crate::codec::ENCODING_RESERVE;
use crate::config::{whole_seconds, SqsConfig, DEDUP_WINDOW, MAX_DELAY, MAX_VISIBILITY};
use crate::error::{map_sdk, Call};

/// SQS: entries per batch call (send, delete, change visibility, receive).
pub(crate) const MAX_BATCH: usize = 10;
/// SQS: most bytes of one `SendMessageBatch` (the sum of its messages' sizes).
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The SDK client for `config`: rustls with ring (not the SDK's default aws-lc, which
/// builds from C), the SDK's standard retries with `max_attempts`, ferrymq's timeouts,
/// and static credentials when the config has them (else the AWS default chain).
pub(crate) async fn sdk_client(config: &SqsConfig) -> Result<Client> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts))
        .timeout_config(timeouts(config, Duration::ZERO));
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &config.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(
            id.expose(),
            secret.expose(),
            config
                .session_token
                .as_ref()
                .map(|t| t.expose().to_string()),
            None,
            "ferrymq-sqs-config",
        ));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(Error::invalid_config(
            "region",
            "no AWS region: set region= in the URL, AWS_REGION, or the profile's region",
        ));
    }
    Ok(Client::new(&sdk))
}

/// Timeouts of one call that may long-poll for `wait`.
pub(crate) fn timeouts(config: &SqsConfig, wait: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(config.connect_timeout)
        .operation_attempt_timeout(config.request_timeout.saturating_add(wait))
        .build()
}

/// What a queue is, read once when a producer, consumer or admin opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueProfile {
    pub url: String,
    pub arn: Option<String>,
    pub fifo: bool,
    /// `MaximumMessageSize`.
    pub max_size: usize,
    /// The visibility timeout sent with every receive.
    pub visibility: Duration,
    /// `RedrivePolicy.maxReceiveCount`.
    pub max_receives: Option<u32>,
    /// `RedrivePolicy.deadLetterTargetArn`.
    pub dlq_arn: Option<String>,
}

/// One opened queue: client, URL, settings and capabilities, shared by the
/// producers, consumers and acks of one `open`.
#[derive(Debug)]
pub(crate) struct Queue {
    pub client: Client,
    pub config: SqsConfig,
    pub name: Arc<str>,
    pub profile: QueueProfile,
    pub caps: Arc<Capabilities>,
}

impl Queue {
    pub(crate) fn url(&self) -> &str {
        &self.profile.url
    }

    pub(crate) fn fifo(&self) -> bool {
        self.profile.fifo
    }

    /// The visibility timeout in seconds as SQS takes it.
    pub(crate) fn visibility_secs(&self) -> i32 {
        whole_seconds(self.profile.visibility)
    }

    pub(crate) fn visibility(&self) -> Duration {
        self.profile.visibility
    }

    pub(crate) fn what(&self, op: &str) -> String {
        format!("{op} on queue {}", self.name)
    }

    /// Approximate counts from the queue's attributes.
    pub(crate) async fn depth(&self) -> Result<Depth> {
        let attrs = get_attributes(
            &self.client,
            self.url(),
            &self.name,
            &[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            ],
        )
        .await?;
        Ok(depth_of(&attrs))
    }
}

pub(crate) fn depth_of(attrs: &HashMap<QueueAttributeName, String>) -> Depth {
    let count = |name: QueueAttributeName| {
        attrs
            .get(&name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Depth {
        waiting: count(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        dead_lettered: 0,
    }
}

pub(crate) async fn get_attributes(
    client: &Client,
    url: &str,
    name: &str,
    names: &[QueueAttributeName],
) -> Result<HashMap<QueueAttributeName, String>> {
    let out = client
        .get_queue_attributes()
        .queue_url(url)
        .set_attribute_names(Some(names.to_vec()))
        .send()
        .await
        .map_err(|e| {
            map_sdk(
                &format!("GetQueueAttributes on queue {name}"),
                Call::Other,
                e,
            )
        })?;
    Ok(out.attributes.unwrap_or_default())
}

/// The URL of queue `name`, or `None` when it does not exist.
pub(crate) async fn find_queue_url(
    client: &Client,
    config: &SqsConfig,
    name: &str,
) -> Result<Option<String>> {
    let result = client
        .get_queue_url()
        .queue_name(name)
        .set_queue_owner_aws_account_id(config.account.clone())
        .send()
        .await;
    match result {
        Ok(out) => Ok(out.queue_url),
        Err(e) => {
            let e = map_sdk(&format!("GetQueueUrl of queue {name}"), Call::Other, e);
            if e.kind() == ErrorKind::NotFound {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// The ARN in a `RedrivePolicy` JSON and its `maxReceiveCount`.
pub(crate) fn parse_redrive_policy(policy: &str) -> (Option<String>, Option<u32>) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(policy) else {
        return (None, None);
    };
    let arn = value
        .get("deadLetterTargetArn")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    // SQS writes it as a number; older tools wrote a string.
    let max = value.get("maxReceiveCount").and_then(|v| {
        v.as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|n| u32::try_from(n).ok())
    });
    (arn, max)
}

/// The queue name at the end of an SQS ARN (`arn:aws:sqs:region:account:name`).
pub(crate) fn name_of_arn(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

/// Read what the queue at `url` is.
pub(crate) async fn profile(
    client: &Client,
    config: &SqsConfig,
    url: &str,
) -> Result<QueueProfile> {
    let attrs = get_attributes(
        client,
        url,
        &config.queue,
        &[
            QueueAttributeName::QueueArn,
            QueueAttributeName::FifoQueue,
            QueueAttributeName::MaximumMessageSize,
            QueueAttributeName::VisibilityTimeout,
            QueueAttributeName::RedrivePolicy,
        ],
    )
    .await?;
    let fifo = attrs
        .get(&QueueAttributeName::FifoQueue)
        .is_some_and(|v| v == "true");
    let max_size = attrs
        .get(&QueueAttributeName::MaximumMessageSize)
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(256 * 1024);
    let queue_visibility = attrs
        .get(&QueueAttributeName::VisibilityTimeout)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30));
    // Whole seconds, rounded up: what SQS will apply.
    let visibility = config.visibility_timeout.map_or(queue_visibility, |v| {
        Duration::from_secs(u64::try_from(whole_seconds(v)).unwrap_or(0))
    });
    let (dlq_arn, max_receives) = attrs
        .get(&QueueAttributeName::RedrivePolicy)
        .map(|p| parse_redrive_policy(p))
        .unwrap_or((None, None));
    if let (Some(wanted), Some(actual)) = (config.max_receives, max_receives) {
        if wanted != actual {
            tracing::warn!(
                queue = %config.queue,
                wanted,
                actual,
                "ferrymq-sqs: the queue exists with another maxReceiveCount; using the queue's"
            );
        }
    }
    Ok(QueueProfile {
        url: url.to_string(),
        arn: attrs.get(&QueueAttributeName::QueueArn).cloned(),
        fifo,
        max_size,
        visibility,
        max_receives,
        dlq_arn,
    })
}

/// What producers and consumers of a queue like `profile` can do.
pub(crate) fn capabilities(profile: &QueueProfile) -> Capabilities {
    let mut caps = Capabilities::minimal("sqs");
    caps.ordering = if profile.fifo {
        Ordering::PerKey
    } else {
        Ordering::None
    };
    caps.max_delay = (!profile.fifo).then_some(MAX_DELAY);
    caps.dedup_window = profile.fifo.then_some(DEDUP_WINDOW);
    caps.visibility_timeout = Some(profile.visibility);
    caps.max_visibility = Some(MAX_VISIBILITY);
    caps.extend_visibility = true;
    caps.max_nack_delay = Some(MAX_VISIBILITY);
    caps.nack_delay_blocks = false;
    caps.release_keeps_attempt = false;
    caps.max_message_size = profile.max_size.saturating_sub(ENCODING_RESERVE);
    caps.max_batch = MAX_BATCH;
    caps.attempts = Attempts::Approximate;
    caps.depth = Accuracy::Approximate;
    caps.bounded = false;
    caps.native_dead_letter_after = profile.max_receives;
    caps
}

/// Create `name` with `attributes`; returns its URL.
pub(crate) async fn create_queue(
    client: &Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let out = client
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(|e| map_sdk(&format!("CreateQueue of queue {name}"), Call::Other, e))?;
    out.queue_url.ok_or_else(|| {
        Error::new(
            ErrorKind::Backend,
            format!("CreateQueue of queue {name} answered without a queue URL"),
        )
    })
}

/// The attributes ferrymq creates a queue with from `config` (FIFO, visibility).
pub(crate) fn create_attributes(
    config: &SqsConfig,
    fifo: bool,
) -> HashMap<QueueAttributeName, String> {
    let mut attrs = HashMap::new();
    if fifo {
        attrs.insert(QueueAttributeName::FifoQueue, "true".to_string());
    }
    if let Some(v) = config.visibility_timeout {
        attrs.insert(
            QueueAttributeName::VisibilityTimeout,
            whole_seconds(v).to_string(),
        );
    }
    attrs
}

/// Create the dead-letter queue of `config` (if missing) and return its ARN.
pub(crate) async fn ensure_dlq(client: &Client, config: &SqsConfig) -> Result<String> {
    let name = config.dlq_name();
    let url = match find_queue_url(client, config, &name).await? {
        Some(url) => url,
        None => {
            let mut dlq_config = config.clone();
            dlq_config.visibility_timeout = None;
            create_queue(
                client,
                &name,
                create_attributes(&dlq_config, config.is_fifo()),
            )
            .await?
        }
    };
    let attrs = get_attributes(client, &url, &name, &[QueueAttributeName::QueueArn]).await?;
    attrs
        .get(&QueueAttributeName::QueueArn)
        .cloned()
        .ok_or_else(|| Error::new(ErrorKind::Backend, format!("queue {name} has no QueueArn")))
}

/// Allow only `source_arn` to use the queue at `dlq_url` as its dead-letter queue.
pub(crate) async fn allow_redrive_from(
    client: &Client,
    dlq_name: &str,
    dlq_url: &str,
    source_arn: &str,
) -> Result<()> {
    let policy = serde_json::json!({
        "redrivePermission": "byQueue",
        "sourceQueueArns": [source_arn],
    })
    .to_string();
    client
        .set_queue_attributes()
        .queue_url(dlq_url)
        .attributes(QueueAttributeName::RedriveAllowPolicy, policy)
        .send()
        .await
        .map_err(|e| {
            map_sdk(
                &format!("SetQueueAttributes(RedriveAllowPolicy) on queue {dlq_name}"),
                Call::Other,
                e,
            )
        })?;
    Ok(())
}

/// Create the queue of `config` with its settings (and its native dead-letter queue
/// when `max_receives` is set); returns the queue URL.
pub(crate) async fn create_with_config(
    client: &Client,
    config: &SqsConfig,
    extra: HashMap<QueueAttributeName, String>,
) -> Result<String> {
    let fifo = config.is_fifo();
    let mut attrs = create_attributes(config, fifo);
    attrs.extend(extra);
    let dlq_arn = match config.max_receives {
        Some(max) => {
            let arn = ensure_dlq(client, config).await?;
            attrs.insert(
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": max}).to_string(),
            );
            Some(arn)
        }
        None => None,
    };
    let url = create_queue(client, &config.queue, attrs).await?;
    if dlq_arn.is_some() {
        let source = get_attributes(client, &url, &config.queue, &[QueueAttributeName::QueueArn])
            .await?
            .remove(&QueueAttributeName::QueueArn);
        let dlq_name = config.dlq_name();
        if let (Some(source), Some(dlq_url)) =
            (source, find_queue_url(client, config, &dlq_name).await?)
        {
            allow_redrive_from(client, &dlq_name, &dlq_url, &source).await?;
        }
    }
    Ok(url)
}

/// Resolve (and with `create`, create) the queue of `config`.
pub(crate) async fn resolve(client: &Client, config: &SqsConfig) -> Result<String> {
    if let Some(url) = &config.queue_url {
        return Ok(url.clone());
    }
    match find_queue_url(client, config, &config.queue).await? {
        Some(url) => Ok(url),
        None if config.create => create_with_config(client, config, HashMap::new()).await,
        None => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "SQS queue {} does not exist (add create=true to create it)",
                config.queue
            ),
        )),
    }
}

/// Open the queue of `config` for producers and consumers.
pub(crate) async fn open(config: &SqsConfig) -> Result<Arc<Queue>> {
    config.validate()?;
    let client = sdk_client(config).await?;
    let url = resolve(&client, config).await?;
    let profile = profile(&client, config, &url).await?;
    if profile.fifo != config.is_fifo() {
        return Err(Error::invalid_config(
            "queue",
            format!(
                "queue {} is {}, but its name says {}",
                config.queue,
                if profile.fifo { "FIFO" } else { "standard" },
                if config.is_fifo() { "FIFO" } else { "standard" }
            ),
        ));
    }
    let caps = Arc::new(capabilities(&profile));
    Ok(Arc::new(Queue {
        client,
        config: config.clone(),
        name: Arc::from(config.queue.as_str()),
        profile,
        caps,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_policies_parse() {
        let (arn, max) = parse_redrive_policy(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:r:1:q-dlq","maxReceiveCount":3}"#,
        );
        assert_eq!(arn.as_deref(), Some("arn:aws:sqs:r:1:q-dlq"));
        assert_eq!(max, Some(3));
        assert_eq!(
            parse_redrive_policy(r#"{"maxReceiveCount":"7"}"#).1,
            Some(7)
        );
        assert_eq!(parse_redrive_policy("not json"), (None, None));
        assert_eq!(name_of_arn("arn:aws:sqs:r:1:q-dlq"), "q-dlq");
    }
}
