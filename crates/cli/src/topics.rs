//! `flotilla topics publish|tail|list`: events on `<p>.topics.>`, stored in the topics stream, and
//! the templates subscribed to them (their durable `topics-<template>` consumers).

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt as _;

use crate::client::connect;
use crate::{Cli, Failure};

#[derive(Debug, clap::Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub op: TopicsOp,
}

#[derive(Debug, clap::Subcommand)]
pub enum TopicsOp {
    /// Publish an event (JSON, or else text) on a topic; prints its sequence once stored.
    Publish {
        /// The topic, e.g. `orders.created`.
        topic: String,
        body: String,
    },
    /// Follow a topic pattern's events (`orders.*`, `>`).
    Tail {
        #[arg(default_value = ">")]
        pattern: String,
        /// From the oldest event kept, not from now.
        #[arg(long)]
        from_start: bool,
    },
    /// Topics with events kept, and the templates subscribed (with how far behind they are).
    List,
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::new(2, anyhow::anyhow!("{e}"))
}

fn valid(topic: &str, pattern: bool) -> bool {
    let tokens: Vec<&str> = topic.split('.').collect();
    let last = tokens.len().saturating_sub(1);
    tokens.iter().enumerate().all(|(i, t)| {
        flotilla_protocol::names::is_token(t) || (pattern && (*t == "*" || (*t == ">" && i == last)))
    })
}

pub async fn run(cli: &Cli, args: &TopicsArgs) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let prefix = format!("{}.topics.", fleet.names.prefix());
    match &args.op {
        TopicsOp::Publish { topic, body } => {
            if !valid(topic, false) {
                return Err(usage("the topic must be dot-separated words of A-Z a-z 0-9 _ -"));
            }
            let value: serde_json::Value =
                serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.clone()));
            let mut h = async_nats::HeaderMap::new();
            h.insert(flotilla_protocol::headers::CONTENT_TYPE, flotilla_protocol::headers::APPLICATION_JSON);
            let ack = fleet
                .js
                .publish_with_headers(fleet.names.topic_subject(topic), h, value.to_string().into())
                .await
                .context("failed to publish")?
                .await
                .context("the topics stream did not store the event (has a Flotilla service run here?)")?;
            if cli.json {
                println!("{}", serde_json::json!({ "topic": topic, "seq": ack.sequence }));
            } else {
                println!("published on {topic} (seq {})", ack.sequence);
            }
        }
        TopicsOp::Tail { pattern, from_start } => {
            if !valid(pattern, true) {
                return Err(usage("the pattern must be dot-separated words, * or a final >"));
            }
            let stream =
                fleet.js.get_stream(fleet.names.topics_stream()).await.context("no topics stream")?;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    name: Some(flotilla_service::nats::ordered_name()),
                    filter_subject: fleet.names.topic_subject(pattern),
                    deliver_policy: if *from_start { DeliverPolicy::All } else { DeliverPolicy::New },
                    ..Default::default()
                })
                .await
                .context("failed to follow the topic")?;
            let mut messages = consumer.messages().await.context("failed to follow the topic")?;
            let stop = flotilla_service::shutdown::wait_for_signal();
            tokio::pin!(stop);
            loop {
                let m = tokio::select! {
                    _ = &mut stop => return Ok(()),
                    m = messages.next() => match m { None => return Ok(()), Some(m) => m.context("topic stream error")? },
                };
                let topic = m.subject.as_str().strip_prefix(&prefix).unwrap_or(m.subject.as_str()).to_owned();
                let body = String::from_utf8_lossy(&m.payload).into_owned();
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
                if cli.json {
                    let value: serde_json::Value =
                        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
                    println!("{}", serde_json::json!({ "topic": topic, "seq": seq, "body": value }));
                } else {
                    println!("{seq:>8} {topic}: {body}");
                }
            }
        }
        TopicsOp::List => {
            let stream =
                fleet.js.get_stream(fleet.names.topics_stream()).await.context("no topics stream")?;
            let mut subjects = stream
                .info_with_subjects(fleet.names.topics_all())
                .await
                .context("failed to read the topics stream")?;
            let mut topics: Vec<(String, usize)> = Vec::new();
            while let Some(entry) = subjects.next().await {
                let (s, n) = entry.context("failed to read the topics stream")?;
                topics.push((s.strip_prefix(&prefix).unwrap_or(&s).to_owned(), n));
            }
            topics.sort();
            let mut subs = Vec::new();
            let mut consumers = stream.consumers();
            while let Some(c) = consumers.next().await {
                let c = c.context("failed to list the subscriptions")?;
                if let Some(template) = c.name.strip_prefix("topics-") {
                    let patterns: Vec<String> = c
                        .config
                        .filter_subjects
                        .iter()
                        .map(|s| s.strip_prefix(&prefix).unwrap_or(s).to_owned())
                        .collect();
                    subs.push((template.to_owned(), patterns, c.num_pending, c.num_ack_pending));
                }
            }
            subs.sort();
            if cli.json {
                let out = serde_json::json!({
                    "topics": topics.iter().map(|(t, n)| serde_json::json!({ "topic": t, "events": n })).collect::<Vec<_>>(),
                    "subscriptions": subs.iter().map(|(t, p, pending, held)| serde_json::json!({
                        "template": t, "topics": p, "pending": pending, "in_progress": held
                    })).collect::<Vec<_>>(),
                });
                println!("{out}");
                return Ok(());
            }
            println!("{:<40} {:>8}", "TOPIC", "EVENTS");
            for (t, n) in &topics {
                println!("{t:<40} {n:>8}");
            }
            println!("\n{:<24} {:<32} {:>8} {:>12}", "TEMPLATE", "SUBSCRIBED TO", "PENDING", "IN PROGRESS");
            for (t, p, pending, held) in &subs {
                println!("{t:<24} {:<32} {pending:>8} {held:>12}", p.join(","));
            }
        }
    }
    Ok(())
}
