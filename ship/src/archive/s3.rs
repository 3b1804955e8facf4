//! The S3 archive (`s3://bucket/prefix`), on `aws-sdk-s3`.
//!
//! The SDK needs tokio; oc's executors are glommio. So the SDK lives on one dedicated
//! thread ("oc-s3") running a current-thread tokio runtime; callers (the shipping
//! thread, `oc-pitr`) send it requests over a channel and block on the reply, which is
//! what the [`Archive`] contract allows (no data shard ever calls an archive).
//!
//! Credentials, region and endpoint come from the standard AWS chain (environment,
//! shared config and credentials files, web identity, IMDS). The URI may override the
//! region and endpoint and ask for path-style addressing, which S3-compatible servers
//! (MinIO, moto) need: `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&path_style=true`.
//! Objects carry the same checksummed envelope as in the local archive; the object
//! version is the ETag, used for `If-Match`, and "only if absent" is `If-None-Match: *`.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use super::{check_key, envelope, Archive, ArchiveError, Condition, Version};

/// Whole-operation timeout: a hung endpoint fails the call (and the shipping round)
/// instead of stalling shipping forever.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

type Reply<T> = mpsc::SyncSender<Result<T, ArchiveError>>;

enum Request {
    Put {
        key: String,
        body: Vec<u8>,
        condition: Condition,
        reply: Reply<Version>,
    },
    Get {
        key: String,
        reply: Reply<Option<(Vec<u8>, Version)>>,
    },
    List {
        prefix: String,
        reply: Reply<Vec<String>>,
    },
    Delete {
        key: String,
        reply: Reply<()>,
    },
}

pub struct S3Archive {
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
}

/// What an `s3://` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct S3Location {
    bucket: String,
    /// Ends with `/` unless empty.
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: bool,
}

fn parse_uri(uri: &str) -> Result<S3Location, ArchiveError> {
    let bad = |why: &str| ArchiveError::Uri {
        uri: uri.into(),
        why: why.into(),
    };
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| bad("expected s3://bucket/prefix"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(bad(
            "the bucket name must be 3-63 characters of a-z, 0-9, '-' and '.'",
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        check_key(prefix).map_err(|e| bad(&format!("prefix: {e}")))?;
        format!("{prefix}/")
    };
    let mut location = S3Location {
        bucket: bucket.into(),
        prefix,
        endpoint: None,
        region: None,
        path_style: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("endpoint", v)) => location.endpoint = Some(v.into()),
            Some(("region", v)) => location.region = Some(v.into()),
            Some(("path_style", "true")) => location.path_style = true,
            Some(("path_style", "false")) => location.path_style = false,
            _ => {
                return Err(bad(&format!(
                    "unknown option {pair:?}: use endpoint=<url>, region=<name>, path_style=true"
                )))
            }
        }
    }
    Ok(location)
}

fn io_error(key: &str, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Io {
        key: key.into(),
        source: Arc::new(std::io::Error::other(e.to_string())),
    }
}

/// S3 answers a failed condition with 412 `PreconditionFailed`, and racing
/// conditional writes with 409 `ConditionalRequestConflict`.
fn is_precondition<E: ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    let status = e.raw_response().map(|r| r.status().as_u16());
    matches!(
        e.code(),
        Some("PreconditionFailed" | "ConditionalRequestConflict")
    ) || status == Some(412)
}

impl S3Archive {
    /// Connects (lazily: the first call reaches the endpoint) to the bucket a URI names.
    pub fn open(uri: &str) -> Result<S3Archive, ArchiveError> {
        let location = parse_uri(uri)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_error(uri, e))?;
        let (requests, mut inbox) = tokio::sync::mpsc::unbounded_channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), ArchiveError>>(1);
        let uri_owned = uri.to_string();
        std::thread::Builder::new()
            .name("oc-s3".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let client = match make_client(&location).await {
                        Ok(client) => {
                            let _ = ready_tx.send(Ok(()));
                            client
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(io_error(&uri_owned, e)));
                            return;
                        }
                    };
                    let shared = Arc::new((client, location));
                    while let Some(request) = inbox.recv().await {
                        tokio::spawn(serve(shared.clone(), request));
                    }
                });
            })
            .map_err(|e| io_error(uri, e))?;
        ready_rx
            .recv()
            .map_err(|_| io_error(uri, "the S3 thread stopped"))??;
        Ok(S3Archive { requests })
    }

    fn call<T>(
        &self,
        key: &str,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, ArchiveError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(make(reply))
            .map_err(|_| io_error(key, "the S3 thread stopped"))?;
        answer
            .recv()
            .map_err(|_| io_error(key, "the S3 thread dropped the request"))?
    }
}

async fn make_client(location: &S3Location) -> Result<Client, String> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &location.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &location.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(
            "no AWS region: set AWS_REGION or add ?region=<name> to the archive URI".into(),
        );
    }
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(location.path_style)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .build();
    Ok(Client::from_conf(config))
}

async fn serve(shared: Arc<(Client, S3Location)>, request: Request) {
    let (client, at) = (&shared.0, &shared.1);
    let full = |key: &str| format!("{}{key}", at.prefix);
    match request {
        Request::Put {
            key,
            body,
            condition,
            reply,
        } => {
            let mut put = client
                .put_object()
                .bucket(&at.bucket)
                .key(full(&key))
                .body(ByteStream::from(body));
            put = match &condition {
                Condition::Always => put,
                Condition::IfAbsent => put.if_none_match("*"),
                Condition::IfVersion(v) => put.if_match(&v.0),
            };
            let outcome = match put.send().await {
                Ok(out) => Ok(Version(out.e_tag().unwrap_or_default().to_string())),
                Err(e) if is_precondition(&e) => Err(ArchiveError::PreconditionFailed {
                    key: key.clone(),
                    why: format!("{condition:?} does not hold"),
                }),
                Err(e)
                    if matches!(condition, Condition::IfVersion(_))
                        && e.code() == Some("NoSuchKey") =>
                {
                    Err(ArchiveError::PreconditionFailed {
                        key: key.clone(),
                        why: "no object to match".into(),
                    })
                }
                Err(e) => Err(io_error(&key, aws_sdk_s3::error::DisplayErrorContext(e))),
            };
            let _ = reply.send(outcome);
        }
        Request::Get { key, reply } => {
            let outcome = async {
                let got = client
                    .get_object()
                    .bucket(&at.bucket)
                    .key(full(&key))
                    .send()
                    .await;
                let out = match got {
                    Ok(out) => out,
                    Err(e) if e.code() == Some("NoSuchKey") => return Ok(None),
                    Err(e) => {
                        return Err(io_error(&key, aws_sdk_s3::error::DisplayErrorContext(e)))
                    }
                };
                let version = Version(out.e_tag().unwrap_or_default().to_string());
                let sealed = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| io_error(&key, e))?
                    .into_bytes();
                let payload =
                    envelope::open(Vec::from(sealed)).map_err(|why| ArchiveError::Corrupt {
                        key: key.clone(),
                        why,
                    })?;
                Ok(Some((payload, version)))
            };
            let _ = reply.send(outcome.await);
        }
        Request::List { prefix, reply } => {
            let outcome = async {
                let mut keys = Vec::new();
                let mut pages = client
                    .list_objects_v2()
                    .bucket(&at.bucket)
                    .prefix(full(&prefix))
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| {
                        io_error(&prefix, aws_sdk_s3::error::DisplayErrorContext(e))
                    })?;
                    for object in page.contents() {
                        if let Some(key) = object.key().and_then(|k| k.strip_prefix(&at.prefix)) {
                            keys.push(key.to_string());
                        }
                    }
                }
                keys.sort();
                Ok(keys)
            };
            let _ = reply.send(outcome.await);
        }
        Request::Delete { key, reply } => {
            let outcome = client
                .delete_object()
                .bucket(&at.bucket)
                .key(full(&key))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| io_error(&key, aws_sdk_s3::error::DisplayErrorContext(e)));
            let _ = reply.send(outcome);
        }
    }
}

impl Archive for S3Archive {
    fn put_sealed(
        &self,
        key: &str,
        object: &envelope::Sealed,
        condition: &Condition,
    ) -> Result<Version, ArchiveError> {
        check_key(key)?;
        let body = object.to_bytes();
        self.call(key, |reply| Request::Put {
            key: key.into(),
            body,
            condition: condition.clone(),
            reply,
        })
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
        check_key(key)?;
        self.call(key, |reply| Request::Get {
            key: key.into(),
            reply,
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        self.call(prefix, |reply| Request::List {
            prefix: prefix.into(),
            reply,
        })
    }

    fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        check_key(key)?;
        self.call(key, |reply| Request::Delete {
            key: key.into(),
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_bucket_prefix_and_options() {
        let at = parse_uri("s3://oc-backups/prod/eu-1?endpoint=http://127.0.0.1:9000&path_style=true&region=us-east-1")
            .expect("parse");
        assert_eq!(at.bucket, "oc-backups");
        assert_eq!(at.prefix, "prod/eu-1/");
        assert_eq!(at.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(at.region.as_deref(), Some("us-east-1"));
        assert!(at.path_style);
        assert_eq!(parse_uri("s3://bucket").expect("bare").prefix, "");
        for bad in [
            "s3://",
            "s3://B/x",
            "s3://ok-bucket/../x",
            "s3://ok-bucket/x?colour=blue",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
