//! The retry loop shared by the HTTP providers: exponential backoff with jitter, `Retry-After`
//! honoured (capped), retryable errors only, a bounded number of attempts.

use std::future::Future;
use std::time::Duration;

use super::ProviderError;

/// How often and how patiently to retry a provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Tries in total (1 = no retry).
    pub max_attempts: u32,
    /// First backoff; doubles each time.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// Longest single wait, also the cap on a provider's `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(60) }
    }
}

impl RetryPolicy {
    /// The same policy with a single try (for a call whose caller retries).
    pub fn once(self) -> Self {
        Self { max_attempts: 1, ..self }
    }

    /// How long to wait before try `attempt + 1` (a `Retry-After` hint wins, capped).
    pub fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        self.delay(attempt, hint)
    }

    fn delay(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        if let Some(h) = hint {
            return h.min(self.max_delay);
        }
        let capped =
            flotilla_protocol::time::backoff(self.base_delay, attempt.saturating_sub(1), self.max_delay);
        // Up to 25 % jitter, so that many runners do not retry in lockstep.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = capped.mul_f64(f64::from(nanos % 250) / 1000.0);
        capped.saturating_add(jitter).min(self.max_delay)
    }

    /// Runs `call` until it succeeds, fails with a non-retryable error, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, call: F) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        self.run_while(call, || true).await
    }

    /// Like [`RetryPolicy::run`], but a failure is final as soon as `may_retry` says no (asked
    /// after each failed try).
    pub async fn run_while<T, F, Fut, G>(&self, mut call: F, may_retry: G) -> Result<T, ProviderError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
        G: Fn() -> bool,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.max_attempts.max(1) && may_retry() => {
                    let hint = match &e {
                        ProviderError::RateLimited { retry_after } => *retry_after,
                        ProviderError::Server { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let wait = self.delay(attempt, hint);
                    tracing::warn!(attempt, error = %e, wait = ?wait, "provider call failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Parses a `Retry-After` header: seconds, or an HTTP date.
pub fn parse_retry_after(value: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let v = value?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Sends one prepared request and returns the body of a successful answer; any other status
/// becomes the matching provider error (with `Retry-After` when the provider sent one).
pub async fn send(rb: reqwest::RequestBuilder, timeout: Duration) -> Result<String, ProviderError> {
    let resp = send_for_body(rb, timeout).await?;
    resp.text().await.map_err(|e| transport(e, timeout))
}

/// Sends one prepared request and returns a successful response before its body was read (the
/// timeout still bounds the whole exchange, body included); any other status becomes the
/// matching provider error.
pub async fn send_for_body(
    rb: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<reqwest::Response, ProviderError> {
    let resp = rb.timeout(timeout).send().await.map_err(|e| transport(e, timeout))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = parse_retry_after(resp.headers().get(reqwest::header::RETRY_AFTER));
    let text = resp.text().await.map_err(|e| transport(e, timeout))?;
    Err(status_error(status, retry_after, &text))
}

/// Turns a reqwest error into a provider error.
pub fn transport(e: reqwest::Error, timeout: Duration) -> ProviderError {
    if e.is_timeout() { ProviderError::Timeout(timeout) } else { ProviderError::Transport(e.to_string()) }
}

/// Maps a non-success HTTP status and its body to a provider error.
pub fn status_error(status: reqwest::StatusCode, retry_after: Option<Duration>, body: &str) -> ProviderError {
    let message = error_message(body);
    match status.as_u16() {
        429 => ProviderError::RateLimited { retry_after },
        s @ (500..=599) => ProviderError::Server { status: s, message, retry_after },
        s => ProviderError::Refused { status: s, message },
    }
}

/// The `error.message` of an OpenAI- or Anthropic-shaped error body, else the body (cut short).
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error").and_then(|e| e.get("message")).and_then(|m| m.as_str()).map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert!(p.delay(1, None) >= Duration::from_millis(100));
        assert!(p.delay(3, None) >= Duration::from_millis(400));
        assert!(p.delay(9, None) <= Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(30))), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn no_retry_once_the_caller_says_no() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        };
        let calls = std::cell::Cell::new(0);
        let call = || {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(ProviderError::Timeout(Duration::from_secs(1))) }
        };
        assert!(p.run_while(call, || calls.get() < 2).await.is_err());
        assert_eq!(calls.get(), 2, "retried once, then the caller forbade it");
    }

    #[test]
    fn retry_after_seconds() {
        let v = reqwest::header::HeaderValue::from_static("2");
        assert_eq!(parse_retry_after(Some(&v)), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(None), None);
        let past = reqwest::header::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(Some(&past)), Some(Duration::ZERO));
    }
}
