//! A sink of one's own: each user record becomes a DynamoDB item, written with
//! `BatchWriteItem`, against the public [`Sink`] trait exactly as a user would write it.
//!
//! Items are keyed by the user record's idempotency key (`<sequence number>` or
//! `<sequence number>:<sub-sequence number>`): what a retry writes again overwrites the same
//! item, so retries never duplicate. `UnprocessedItems` (DynamoDB's per-item refusal) are
//! sent again by the library, alone, with back-off, within the deadline; an item that never
//! goes through reports its Kinesis record to Lambda.
//!
//! The table (`DYNAMODB_TABLE`) needs a string partition key `id`; the role,
//! `dynamodb:BatchWriteItem` on it. Build and deploy it like the main binary:
//! `cargo lambda build --release --arm64 --example dynamodb_sink`.

use std::collections::HashMap;
use std::process::ExitCode;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use kinesis_deagg::kpl::UserRecord;
use kinesis_deagg::sink::{EntryOutcome, Limits, SendError, SendErrorKind, Sink};
use kinesis_deagg::transform::{Error, RecordContext};
use kinesis_deagg::{Processor, Settings};

/// Writes user records into one table.
struct DynamoDbSink {
    client: Client,
    table: String,
}

/// One item, and its key to find it among `UnprocessedItems`.
struct Item {
    id: String,
    item: HashMap<String, AttributeValue>,
    size: usize,
}

impl Sink for DynamoDbSink {
    type Entry = Item;

    /// `BatchWriteItem`: 25 items, 16 MB, and items of 400 KB (names and values counted).
    fn limits(&self) -> Limits {
        Limits {
            max_entries: 25,
            max_request_bytes: 16_000_000,
            max_entry_bytes: 400 * 1024,
        }
    }

    fn entry(&self, record: UserRecord, context: &RecordContext) -> Result<Item, Error> {
        let id = context.idempotency_key();
        let size = "id".len() + id.len() + "pk".len() + record.partition_key().len();
        let size = size + "data".len() + record.data().len();
        let item = HashMap::from([
            ("id".to_string(), AttributeValue::S(id.clone())),
            (
                "pk".to_string(),
                AttributeValue::S(record.partition_key().to_string()),
            ),
            (
                "data".to_string(),
                AttributeValue::B(Blob::new(record.data().to_vec())),
            ),
        ]);
        Ok(Item { id, item, size })
    }

    fn size(&self, entry: &Item) -> usize {
        entry.size
    }

    async fn send(&self, entries: &[Item]) -> Result<Vec<EntryOutcome>, SendError> {
        let writes = entries
            .iter()
            .map(|e| {
                let put = PutRequest::builder().set_item(Some(e.item.clone())).build();
                let put =
                    put.map_err(|e| SendError::new(SendErrorKind::Permanent, e.to_string()))?;
                Ok(WriteRequest::builder().put_request(put).build())
            })
            .collect::<Result<Vec<_>, SendError>>()?;
        let output = self
            .client
            .batch_write_item()
            .request_items(&self.table, writes)
            .send()
            .await
            .map_err(|e| {
                let code = e.code().unwrap_or("");
                let kind = match code {
                    "ProvisionedThroughputExceededException"
                    | "ThrottlingException"
                    | "RequestLimitExceeded" => SendErrorKind::Throttled,
                    // A 5xx, or no answer at all: try again.
                    "InternalServerError" | "" => SendErrorKind::Transient,
                    // ResourceNotFound, Validation, AccessDenied: the same request fails again.
                    _ => SendErrorKind::Permanent,
                };
                SendError::new(
                    kind,
                    format!("BatchWriteItem: {code}: {}", e.message().unwrap_or("")),
                )
            })?;
        // Whatever DynamoDB did not process is named by its key in `UnprocessedItems`.
        let unprocessed: Vec<&str> = output
            .unprocessed_items()
            .and_then(|u| u.get(&self.table))
            .into_iter()
            .flatten()
            .filter_map(|w| w.put_request()?.item().get("id")?.as_s().ok())
            .map(String::as_str)
            .collect();
        Ok(entries
            .iter()
            .map(|e| {
                if unprocessed.contains(&e.id.as_str()) {
                    EntryOutcome::throttled("UnprocessedItems")
                } else {
                    EntryOutcome::Delivered
                }
            })
            .collect())
    }
}

/// The transform: every user record is delivered as it came.
async fn keep(_: UserRecord, _: RecordContext) -> Result<(), Error> {
    Ok(())
}

fn main() -> ExitCode {
    let run = async {
        let settings = Settings::from_env()?;
        let table = std::env::var("DYNAMODB_TABLE").map_err(|_| "DYNAMODB_TABLE is not set")?;
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let sink = DynamoDbSink {
            client: Client::new(&config),
            table,
        };
        kinesis_deagg::run(Processor::with_sink(keep, sink, settings)).await
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime.map_err(Error::from).and_then(|r| r.block_on(run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynamodb_sink: {e}");
            ExitCode::from(2)
        }
    }
}

// The test suite's moto, started on 127.0.0.1.
#[cfg(test)]
#[path = "../tests/common/servers.rs"]
#[allow(dead_code)]
mod servers;

#[cfg(test)]
mod tests {
    //! Against moto's DynamoDB: every user record is an item, delivering the same batch again
    //! (Lambda's retry) overwrites rather than duplicates, and behind the fault proxy only the
    //! `UnprocessedItems` are sent again, with the report exactly the first record missing.
    use super::*;
    use kinesis_deagg::batch::BatchOutcome;
    use kinesis_deagg::event::KinesisEvent;
    use kinesis_deagg::testing::EventBuilder;

    fn client(port: u16) -> Client {
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
                aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"),
            ))
            .build();
        Client::new(&config)
    }

    async fn create_table(client: &Client) {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        client
            .create_table()
            .table_name("records")
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .unwrap();
    }

    /// 30 Kinesis records, 75 user records (several requests of 25), and each one's data.
    fn event() -> (KinesisEvent, Vec<Vec<Vec<u8>>>) {
        let mut b = EventBuilder::new();
        let mut records = Vec::new();
        for i in 0..30usize {
            let users: Vec<(String, Vec<u8>)> = (0..1 + i % 4)
                .map(|j| (format!("k{}", i % 3), format!("{i}.{j}").into_bytes()))
                .collect();
            let refs: Vec<(&str, &[u8])> =
                users.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
            b = b.aggregate(&refs);
            records.push(users.into_iter().map(|(_, d)| d).collect());
        }
        (b.build(), records)
    }

    async fn deliver(client: &Client, settings: Settings, event: &KinesisEvent) -> BatchOutcome {
        let sink = DynamoDbSink {
            client: client.clone(),
            table: "records".into(),
        };
        Processor::with_sink(keep, sink, settings)
            .handle(event, None)
            .await
            .unwrap()
    }

    async fn items(client: &Client) -> Vec<Vec<u8>> {
        let scan = client.scan().table_name("records").send().await.unwrap();
        let mut items: Vec<Vec<u8>> = scan
            .items()
            .iter()
            .map(|item| item["data"].as_b().unwrap().as_ref().to_vec())
            .collect();
        items.sort();
        items
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_user_record_is_one_item_and_a_retry_overwrites_it() {
        let server = crate::servers::moto();
        let client = client(server.port);
        create_table(&client).await;
        let (event, records) = event();
        for _ in 0..2 {
            let outcome = deliver(&client, Settings::default(), &event).await;
            assert_eq!(outcome.failure, None);
        }
        let mut want: Vec<Vec<u8>> = records.into_iter().flatten().collect();
        want.sort();
        assert_eq!(
            items(&client).await,
            want,
            "one item per user record, none twice"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unprocessed_items_alone_are_sent_again_and_the_report_is_exact() {
        for (plan, attempts, reported) in [
            (
                r#"{"seed": 2, "entry_throttle": 0.4, "request_throttle": 0.1, "server_error": 0.1, "reset": 0.05}"#,
                20,
                false,
            ),
            (
                r#"{"seed": 4, "entry_throttle": 0.7, "server_error": 0.1}"#,
                2,
                true,
            ),
        ] {
            let server = crate::servers::moto();
            let faults = crate::servers::proxy(&server, plan);
            let direct = client(server.port);
            create_table(&direct).await;
            let (event, records) = event();
            let mut settings = Settings::default();
            settings.sink.max_attempts = attempts;
            let outcome = deliver(&client(faults.port), settings, &event).await;
            let stats = outcome.stats.sink.clone().unwrap();
            assert!(stats.throttled_entries > 0, "{stats:?}");
            let written = items(&direct).await;
            let first_missing = records
                .iter()
                .position(|users| users.iter().any(|u| written.binary_search(u).is_err()));
            assert_eq!(outcome.failure.as_ref().map(|f| f.index), first_missing);
            assert_eq!(first_missing.is_some(), reported, "{:?}", outcome.failure);
        }
    }
}
